"""examples/airflow_sharded_dag.py run for real under Airflow 3 (``airflow dags test``).

Airflow lives in its own venv, ``.venv-airflow`` (``make .venv-airflow/.installed``,
which ``make test`` runs first), so its ~130 packages never mix with batchrun's.
The DAG shards a file three ways against the mock provider, sharing the rate
through Redis as the job file says, and merges; the merged output must be
byte for byte what one process writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from batchrun.mock.server import MockServer
from tests.conftest import chat, write_jsonl
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW = ROOT / ".venv-airflow" / "bin" / "airflow"
DAG = ROOT / "examples" / "airflow_sharded_dag.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not AIRFLOW.exists(),
        reason="Airflow's venv is missing: run make .venv-airflow/.installed (make test does)",
    ),
]


def airflow_env(home: Path, dags: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHRUN_", "AIRFLOW"))}
    return {
        **env,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "BATCHRUN": f"{sys.executable} -m batchrun",  # the project's own, not one on PATH
        "OPENAI_API_KEY": "k",
    }


async def airflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    done = await anyio.run_process([str(AIRFLOW), *args], env=env, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")[-3000:]
    return done


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_the_sharded_dag_under_airflow_dags_test(tmp_path: Path, server: MockServer) -> None:
    redis = RedisServer(tmp_path).start()
    try:
        # Row 8 fails for good (a 400): its shard finishes with exit 1, which
        # must not fail the task, or the merge would never run.
        rows = [chat(f"row {i}" + (" mock:fail=400" if i == 7 else "")) for i in range(40)]
        inp = write_jsonl(tmp_path / "in.jsonl", rows)
        job = tmp_path / "job.toml"
        job.write_text(
            f'provider = "openai"\nbase_url = "{server.base_url}"\nmodel = "m"\n'
            f'[limits]\nrpm = 6000\nshared_limits = "{redis.url}"\n'
        )
        dags = tmp_path / "dags"
        dags.mkdir()
        shutil.copy(DAG, dags / DAG.name)
        env = airflow_env(tmp_path / "airflow-home", dags)
        await airflow(env, "db", "migrate")
        out = tmp_path / "answers" / "answers.jsonl"
        conf = {"input": str(inp), "out": str(out), "job": str(job), "shards": 3}
        await airflow(env, "dags", "test", "batchrun_sharded", "-c", json.dumps(conf))
        single = tmp_path / "single.jsonl"
        cmd = [sys.executable, "-m", "batchrun", "run", str(inp), "--out", str(single)]
        done = await anyio.run_process(
            [*cmd, "--job", str(job), "--no-progress"], env=env, check=False
        )
        assert done.returncode == 1  # finished, one row failed
    finally:
        redis.stop()
    parts = sorted(p.name for p in out.parent.glob("answers.part-*-of-3.jsonl"))
    assert parts == [f"answers.part-{i}-of-3.jsonl" for i in range(3)]
    assert out.read_bytes() == single.read_bytes()
    assert len(out.read_bytes().splitlines()) == 40
