"""batchrun: an async batch job runner for bulk model calls.

The same run as ``batchrun run`` from Python (a notebook, an Airflow task)::

    from batchrun import build_config, run

    summary = run(build_config({"input": "in.jsonl", "out": "out.jsonl",
                                "provider": "dashscope", "model": "qwen-plus"}))
    print(summary.render(), summary.exit_code)
"""

from batchrun.config import Limits, RetryPolicy, RunConfig, Timeouts
from batchrun.errors import (
    BatchrunError,
    FatalError,
    RequestError,
    RowError,
    TransientError,
    UsageError,
)
from batchrun.jobfile import build_config, load_job_file
from batchrun.progress import Summary
from batchrun.results import read_results, to_pandas
from batchrun.runner import run, run_async

__all__ = [
    "BatchrunError",
    "FatalError",
    "Limits",
    "RequestError",
    "RetryPolicy",
    "RowError",
    "RunConfig",
    "Summary",
    "Timeouts",
    "TransientError",
    "UsageError",
    "build_config",
    "load_job_file",
    "read_results",
    "run",
    "run_async",
    "to_pandas",
]
