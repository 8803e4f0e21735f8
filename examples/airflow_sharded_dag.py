"""An Airflow DAG that answers a large prompt file in parallel shards.

Each mapped task runs one shard (`--shard I/N`) into its own output; a final
task merges the shards into one output in input order. Retries are safe:
a shard resumes where it stopped, and a finished shard's rerun is a no-op.

The account's rate limits are shared by all shards: give each shard
`--rpm` / `--tpm` of about the account's limit divided by N (see the README).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.decorators import dag, task
from airflow.operators.bash import BashOperator

SHARDS = 4
INPUT = "/data/prompts/{{ ds }}.jsonl"
PARTS = "/data/answers/{{ ds }}"
JOB = "/opt/batchrun/jobs/dashscope.toml"


@dag(schedule="@daily", start_date=datetime(2026, 1, 1), catchup=False, max_active_tasks=SHARDS)
def answer_prompts() -> None:
    @task
    def shard_commands() -> list[str]:
        return [
            f"batchrun run {INPUT} --out {PARTS}/part-{i}.jsonl --shard {i}/{SHARDS}"
            f" --job {JOB} --rpm 300 --summary {PARTS}/part-{i}.summary.json"
            for i in range(SHARDS)
        ]

    shards = BashOperator.partial(
        task_id="shard",
        retries=5,
        retry_delay=timedelta(minutes=2),
        execution_timeout=timedelta(hours=6),  # SIGTERM: the shard stops within --grace
    ).expand(bash_command=shard_commands())

    merge = BashOperator(
        task_id="merge",
        bash_command=(
            "batchrun merge "
            + " ".join(f"{PARTS}/part-{i}.jsonl" for i in range(SHARDS))
            + f" --out {PARTS}/answers.jsonl"
        ),
    )

    shards >> merge


answer_prompts()
