"""batchrun: an async batch job runner for bulk model calls.

The same run as ``batchrun run`` from Python (a notebook, an Airflow task)::

    from batchrun import build_config, run

    summary = run(build_config({"input": "in.jsonl", "out": "out.jsonl",
                                "provider": "dashscope", "model": "qwen-plus"}))
    print(summary.render(), summary.exit_code)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchrun.config import Limits, RetryPolicy, RunConfig, Timeouts
    from batchrun.errors import (
        BatchrunError,
        FatalError,
        LockedError,
        RequestError,
        RowError,
        TransientError,
        UsageError,
    )
    from batchrun.jobfile import build_config, load_job_file
    from batchrun.results import read_results, to_pandas
    from batchrun.runner import run, run_async
    from batchrun.stats import Summary

# The release, read by the build (pyproject.toml) and by ``batchrun --version``.
__version__ = "0.1.0"

# Each public name and the module it lives in, imported on first use: a bare
# ``import batchrun`` (and ``batchrun --version``) loads no HTTP stack.
_HOMES = {
    "Limits": "config",
    "RetryPolicy": "config",
    "RunConfig": "config",
    "Timeouts": "config",
    "BatchrunError": "errors",
    "FatalError": "errors",
    "LockedError": "errors",
    "RequestError": "errors",
    "RowError": "errors",
    "TransientError": "errors",
    "UsageError": "errors",
    "build_config": "jobfile",
    "load_job_file": "jobfile",
    "Summary": "stats",
    "read_results": "results",
    "to_pandas": "results",
    "run": "runner",
    "run_async": "runner",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"batchrun.{home}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BatchrunError",
    "FatalError",
    "Limits",
    "LockedError",
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
