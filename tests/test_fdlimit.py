"""Room for the run's connections (``batchrun.fdlimit``): the open-files limit
is raised when it may be, and a run that cannot fit is refused before it
sends or writes anything. Each case runs in a child process whose limits
are lowered, so the test process keeps its own."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from pathlib import Path

from batchrun.fdlimit import FILES_BESIDE_CONNECTIONS, files_needed
from tests.test_cli import ROOT, cli_env


def _limited(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_files_needed_counts_every_connection_and_the_run_s_own_files() -> None:
    assert files_needed(1_000) == 1_000 + FILES_BESIDE_CONNECTIONS


def test_a_low_soft_limit_is_raised_to_what_the_pool_needs() -> None:
    script = textwrap.dedent(
        """
        import resource
        from batchrun.fdlimit import make_room
        make_room(100)
        print(*resource.getrlimit(resource.RLIMIT_NOFILE))
        make_room(10)  # enough already: left as it is
        print(*resource.getrlimit(resource.RLIMIT_NOFILE))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        preexec_fn=lambda: _limited(150, 4_096),
    )
    assert done.returncode == 0, done.stderr
    needed = files_needed(100)
    assert done.stdout.split() == [str(needed), "4096", str(needed), "4096"]


def test_a_run_whose_pool_cannot_fit_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "out.jsonl"
    args = ["run", str(source), "--out", str(out), "--provider", "mock", "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-m", "batchrun", *args, "--connection-pool-size", "300"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
        cwd=ROOT,
        preexec_fn=lambda: _limited(200, 200),
    )
    assert done.returncode == 2, done.stderr
    assert "--connection-pool-size 300" in done.stderr
    assert "ulimit -n" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert not out.with_name("out.jsonl.batchrun").exists()


def _batch_run(
    tmp_path: Path, soft: int, hard: int
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """350 rows in 350 batch parts on the embedded mock: their results files
    are read at once at the end, past the ``soft`` limit on open files."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(f'{{"messages": [{{"role": "user", "content": "row {i}"}}]}}\n' for i in range(350))
    )
    out = tmp_path / "out.jsonl"
    args = ["run", str(source), "--out", str(out), "--provider", "mock", "--no-progress"]
    batch = ["--mode", "batch", "--batch-rows", "1", "--poll-interval", "0.2"]
    done = subprocess.run(
        [sys.executable, "-m", "batchrun", *args, *batch],
        capture_output=True,
        text=True,
        timeout=240,
        env=cli_env(),
        cwd=ROOT,
        preexec_fn=lambda: _limited(soft, hard),
    )
    return done, out


def test_many_batch_parts_raise_the_soft_limit_for_their_results_files(tmp_path: Path) -> None:
    done, out = _batch_run(tmp_path, soft=300, hard=4_096)

    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 350


def test_many_batch_parts_past_the_hard_limit_stop_with_a_message_not_a_traceback(
    tmp_path: Path,
) -> None:
    done, out = _batch_run(tmp_path, soft=300, hard=300)

    assert done.returncode == 2, done.stderr
    assert "350 batch parts" in done.stderr
    assert "ulimit -n" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
