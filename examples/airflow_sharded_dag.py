"""An Airflow 3 DAG that answers a large prompt file in parallel shards.

Trigger it with the params ``input`` (the JSONL file), ``out`` (the merged
output), ``job`` (the job file) and ``shards`` (how many), for example::

    airflow dags trigger batchrun_sharded -c '{"input": "/data/prompts.jsonl",
        "out": "/data/answers.jsonl", "job": "/opt/batchrun/jobs/dashscope.toml", "shards": 4}'

Each mapped ``shard`` task runs ``batchrun run --shard I/N`` into its own
part beside ``out`` (``answers.part-I-of-N.jsonl``); the ``merge`` task joins
the parts into ``out`` in input order. A shard that finishes with failed rows
(exit 1: each has its error record) succeeds, so the merge still runs, and
so does a merge of such shards.
Retries are safe: a shard resumes where it stopped, a finished shard's rerun
sends nothing, and the output's lock
makes a retry that overlaps a straggler exit at once (code 4) instead of
running twice. On ``execution_timeout`` Airflow 3 sends SIGTERM to the
command's process group (and no SIGKILL): batchrun stops within ``--grace``
seconds, its progress saved.

The shards share the account's limits through the job file: set ``rpm`` /
``tpm`` to the account's limits and ``shared_limits = "redis://..."`` under
``[limits]``; no shard needs to know how many there are. The job file should
not set ``summary`` or ``metrics_file``: every shard would write that one file. ``BATCHRUN`` in the
workers' environment names the command (default ``batchrun`` on the PATH).
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import Param, dag, get_current_context, task

BATCHRUN = os.environ.get("BATCHRUN", "batchrun")


def _part(out: str, index: int, shards: int) -> str:
    """Shard ``index``'s output, beside the merged output."""
    path = Path(out)
    return str(path.with_name(f"{path.stem}.part-{index}-of-{shards}{path.suffix}"))


def _params() -> dict[str, Any]:
    return dict(get_current_context()["params"])


@dag(
    dag_id="batchrun_sharded",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        "input": Param("/data/prompts.jsonl", type="string", description="JSONL requests"),
        "out": Param("/data/answers.jsonl", type="string", description="merged output"),
        "job": Param("/opt/batchrun/jobs/dashscope.toml", type="string", description="job file"),
        "shards": Param(4, type="integer", minimum=1, description="parallel shards"),
    },
)
def batchrun_sharded() -> None:
    @task
    def shard_commands() -> list[str]:
        p = _params()
        n = int(p["shards"])
        mkdir = f"mkdir -p {shlex.quote(str(Path(p['out']).parent))} && "
        # Exit 1 is a finished shard whose failed rows have their error records:
        # the task succeeds, so the merge runs (a retry would only exit 1 again);
        # `batchrun run ... --retry-failed` on the part resends the retryable ones.
        return [
            f"{mkdir}{BATCHRUN} run {shlex.quote(p['input'])} --job {shlex.quote(p['job'])}"
            f" --out {shlex.quote(_part(p['out'], i, n))} --shard {i}/{n} --no-progress"
            " || [ $? -eq 1 ]"
            for i in range(n)
        ]

    @task
    def merge_command() -> str:
        p = _params()
        n = int(p["shards"])
        parts = " ".join(shlex.quote(_part(p["out"], i, n)) for i in range(n))
        # Exit 1: merged, with the shards' failed rows in it (see shard_commands).
        return f"{BATCHRUN} merge {parts} --out {shlex.quote(p['out'])} || [ $? -eq 1 ]"

    shards = BashOperator.partial(
        task_id="shard",
        retries=5,
        retry_delay=timedelta(minutes=2),
        execution_timeout=timedelta(hours=6),  # SIGTERM: the shard stops within --grace
    ).expand(bash_command=shard_commands())

    merge = BashOperator(task_id="merge", bash_command=merge_command())

    shards >> merge


batchrun_sharded()
