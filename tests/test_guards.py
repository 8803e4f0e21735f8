"""Bad paths and values: one line, exit 2, no traceback, nothing sent, nothing
overwritten. Each case runs the real command line against a real mock server."""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import anyio
import orjson
import pytest
from typer.testing import CliRunner

from batchrun.cli import app
from batchrun.errors import UsageError
from batchrun.merge import merge
from batchrun.mock.server import MockServer
from batchrun.paths import check_written, claim_temporary
from batchrun.runner import run_async
from tests.conftest import chat, make_config, read_jsonl, run_shards, write_jsonl
from tests.fakes import FakeClock
from tests.test_cli import abatchrun

# name -> (extra arguments, with {in}, {out} and {dir} filled in; the message's start)
_BAD_RUNS: dict[str, tuple[list[str], str]] = {
    "summary is out": (["--summary", "{out}"], "--summary {out} is also --out"),
    "summary is the input": (["--summary", "{in}"], "--summary {in} is also the input"),
    "metrics is the input": (["--metrics-file", "{in}"], "--metrics-file {in} is also the input"),
    "metrics is the summary": (
        ["--summary", "{dir}/s.json", "--metrics-file", "{dir}/s.json"],
        "--metrics-file {dir}/s.json is also --summary",
    ),
    "summary is the state dir": (
        ["--summary", "{out}.batchrun"],
        "the state directory {out}.batchrun is also --summary",
    ),
    "out is a directory": (["--out", "{dir}"], "--out {dir} is a directory"),
    "out is empty": (["--out", ""], "out must be non-empty text, got ''"),
    "cache is empty": (["--cache", ""], "cache must be non-empty text, got ''"),
    "summary is empty": (["--summary", ""], "summary must be non-empty text, got ''"),
    "schema is empty": (["--response-schema", ""], "response_schema must be non-empty text"),
    "ca bundle is empty": (["--ca-bundle", " "], "ca_bundle must be non-empty text, got ' '"),
    "out is standard output": (["--out", "-"], "--out -: batchrun writes a file, not standard"),
    "out in a missing directory": (
        ["--out", "{dir}/missing/o.jsonl"],
        "--out {dir}/missing/o.jsonl: the directory {dir}/missing does not exist",
    ),
    "summary under a file": (
        ["--summary", "{in}/s.json"],
        "--summary {in}/s.json: the directory {in} is not a directory",
    ),
    "metrics in /proc": (["--metrics-file", "/proc/b.prom"], "--metrics-file /proc/b.prom: cannot"),
    "rpm inf": (["--rpm", "inf"], "--rpm must be a finite number >= 0.01, got inf"),
    "rpm tiny": (["--rpm", "1e-300"], "--rpm must be a finite number >= 0.01, got 1e-300"),
    "reorder bytes 0": (["--reorder-bytes", "0"], "--reorder-bytes must be a whole number"),
    "tpm 1e400": (["--tpm", "1e400"], "--tpm must be a finite number >= 1, got inf"),
    "ftp base url": (["--base-url", "ftp://x"], "--base-url must be an http:// or https:// URL"),
    "no host": (
        ["--base-url", "http://"],
        "--base-url must be an http:// or https:// URL such as https://host/v1, got 'http://'",
    ),
    "misspelt scheme": (["--base-url", "htps://h/v1"], "--base-url must be an http:// or https"),
    "port past 65535": (["--base-url", "http://h:99999/v1"], "--base-url must be an http://"),
    "port 0": (["--base-url", "http://h:0/v1"], "--base-url must be an http:// or https://"),
    "empty label": (["--base-url", "http://a..b/v1"], "--base-url must be an http:// or https"),
    "space in host": (["--base-url", "http://a b/v1"], "--base-url must be an http:// or https"),
    "query in base url": (
        ["--base-url", "http://127.0.0.1:9/v1?api-version=1"],
        "--base-url must be a base URL without a query (?), a fragment (#) or spaces",
    ),
    "fragment in base url": (["--base-url", "http://h/v1#x"], "--base-url must be a base URL"),
    "space after base url": (["--base-url", "http://h/v1 "], "--base-url must be a base URL"),
    "summary is the cache store": (
        ["--cache", "{dir}/c", "--summary", "{dir}/c/results.sqlite"],
        "--summary {dir}/c/results.sqlite is also the --cache store",
    ),
    "summary is the job file": (
        ["--job", "{dir}/job.toml", "--summary", "{dir}/job.toml"],
        "--summary {dir}/job.toml is also the job file",
    ),
    "metrics is the schema": (
        ["--response-schema", "{dir}/schema.json", "--metrics-file", "{dir}/schema.json"],
        "--metrics-file {dir}/schema.json is also --response-schema",
    ),
    "metrics is a device": (["--metrics-file", "{dir}/null"], "--metrics-file {dir}/null is not a"),
    "summary is a link": (["--summary", "{dir}/link"], "--summary {dir}/link is a symbolic link"),
    "summary is a store": (
        ["--summary", "{dir}/other.sqlite"],
        "--summary {dir}/other.sqlite is a SQLite database",
    ),
    "user in base url": (
        ["--base-url", "http://u:p@127.0.0.1:9/v1"],
        "--base-url must not hold a user name or password",
    ),
    "retry budget 0": (
        ["--retry-budget", "0"],
        "--retry-budget must be a finite number of seconds > 0",
    ),
    "out name too long": (["--out", "{dir}/" + "o" * 300], "File name too long: {dir}/ooo"),
    "summary name too long": (["--summary", "{dir}/" + "s" * 300], "File name too long: {dir}/sss"),
    "out a loop of links": (
        ["--out", "{dir}/loop"],
        "Too many levels of symbolic links: {dir}/loop",
    ),
    "max cost in batch mode": (
        [
            *("--mode", "batch", "--max-cost", "1"),
            *("--price-input-per-million", "1", "--price-output-per-million", "1"),
        ],
        "--max-cost stops a run before the row that would pass it, and a batch is submitted",
    ),
    "param NaN": (["--param", "temperature=NaN"], "--param temperature=NaN: JSON has no NaN"),
    "param Infinity": (["--param", "max_tokens=-Infinity"], "--param max_tokens=-Infinity: JSON"),
    "param NaN inside": (["--param", "a=[NaN]"], "parameter a is [nan]: JSON has no NaN"),
    "param big integer": (
        ["--param", "n=123456789012345678901234567890"],
        "parameter n is 123456789012345678901234567890: an integer past 64 bits",
    ),
    "param broken JSON": (["--param", "stop=[1, 2,]"], "--param stop=[1, 2,]: not valid JSON"),
}


def _fill(text: str, tmp_path: Path) -> str:
    return text.format(
        **{"in": tmp_path / "in.jsonl", "out": tmp_path / "o.jsonl", "dir": tmp_path}
    )


async def _refused(server: MockServer, tmp_path: Path, *args: str | Path) -> str:
    """Run the command; assert exit 2, one line, no traceback, nothing sent.
    Returns the error line."""
    done = await abatchrun(*args, OPENAI_API_KEY="sk-test")
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("batchrun: error: ")
    assert stderr.count("\n") == 1, stderr
    assert server.stats.requests == 0
    return stderr.removeprefix("batchrun: error: ").strip()


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(_BAD_RUNS))
async def test_a_bad_path_or_value_exits_2_before_sending(
    case: str, tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a"), chat("b")])
    before = source.read_bytes()
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    kept = _files_a_run_must_not_write(tmp_path)
    extra, message = _BAD_RUNS[case]
    args = ["run", source, "--out", tmp_path / "o.jsonl", "--provider", "openai", "--no-progress"]
    if not any(arg == "--base-url" for arg in extra):
        args += ["--base-url", server.base_url]

    line = await _refused(server, tmp_path, *args, *(_fill(a, tmp_path) for a in extra))

    assert line.startswith(_fill(message, tmp_path))
    assert source.read_bytes() == before
    assert not (tmp_path / "o.jsonl").exists()
    assert _files_a_run_must_not_write(tmp_path, make=False) == kept


def _files_a_run_must_not_write(tmp_path: Path, *, make: bool = True) -> dict[str, object]:
    """The job file, schema, cache store, FIFO, link and foreign store the
    cases name (made when ``make``); what each is, to see it left alone."""
    if make:
        (tmp_path / "job.toml").write_text('model = "m"\n')
        (tmp_path / "schema.json").write_text('{"type": "object"}')
        (tmp_path / "c").mkdir()
        for name in ("c/results.sqlite", "other.sqlite"):
            sqlite3.connect(tmp_path / name).execute("CREATE TABLE t (x)").connection.close()
        os.mkfifo(tmp_path / "null")
        (tmp_path / "target.json").write_text("{}")
        (tmp_path / "link").symlink_to(tmp_path / "target.json")
    names = ("job.toml", "schema.json", "c/results.sqlite", "other.sqlite", "target.json")
    found: dict[str, object] = {name: (tmp_path / name).read_bytes() for name in names}
    found["null"] = stat.S_ISFIFO((tmp_path / "null").stat().st_mode)
    found["link"] = (tmp_path / "link").is_symlink()
    return found
    assert not (tmp_path / "s.json").exists()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("job", "message"),
    [
        ('params = "x"', "params must be a table ([params]) of request parameters, got 'x'"),
        ("out = 5", "out must be non-empty text, got 5"),
        ("summary = true", "summary must be non-empty text, got True"),
        ('metrics_file = ""', "metrics_file must be non-empty text, got ''"),
        ('model = ["a"]', "model must be non-empty text, got ['a']"),
        ('adaptive_concurrency = "yes"', "adaptive_concurrency must be true or false, got 'yes'"),
        ("base_urls = []", "base_urls is an empty list: name at least one URL"),
        ("params = { temperature = nan }", "parameter temperature is nan: JSON has no NaN"),
    ],
)
async def test_a_job_file_value_of_the_wrong_type_is_named(
    job: str, message: str, tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a")])
    job_file = tmp_path / "job.toml"
    job_file.write_text(f'{job}\nprovider = "openai"\nbase_url = "{server.base_url}"\n')
    out_args = [] if job.startswith("out") else ["--out", str(tmp_path / "o.jsonl")]

    line = await _refused(
        server, tmp_path, "run", source, *out_args, "--job", job_file, "--no-progress"
    )

    assert message in line


@pytest.mark.asyncio
async def test_a_hard_link_to_the_input_is_the_input(tmp_path: Path, server: MockServer) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a")])
    os.link(source, tmp_path / "alias.json")

    line = await _refused(
        server,
        tmp_path,
        *("run", source, "--out", tmp_path / "o.jsonl", "--provider", "openai"),
        *("--base-url", server.base_url, "--summary", tmp_path / "alias.json", "--no-progress"),
    )

    assert "is also the input" in line


@pytest.mark.asyncio
async def test_an_input_inside_a_state_directory_is_refused_and_kept(
    tmp_path: Path, server: MockServer
) -> None:
    # --restart removes the state directory: the input would go with it.
    state = tmp_path / "k.jsonl.batchrun"
    state.mkdir()
    source = write_jsonl(state / "in.jsonl", [chat("a")])

    line = await _refused(
        server,
        tmp_path,
        *("run", source, "--out", tmp_path / "k.jsonl", "--provider", "openai", "--restart"),
        *("--base-url", server.base_url, "--no-progress"),
    )

    assert line.startswith(f"the input {source} is inside {state}, an output's state directory")
    assert source.exists()


@pytest.mark.asyncio
async def test_a_gzip_input_that_is_not_gzip_is_refused(tmp_path: Path, server: MockServer) -> None:
    source = tmp_path / "in.jsonl.gz"
    source.write_bytes(b'{"messages": []}\n')

    line = await _refused(
        server,
        tmp_path,
        *("run", source, "--out", tmp_path / "o.jsonl", "--provider", "openai"),
        *("--base-url", server.base_url, "--no-progress"),
    )

    assert line.startswith(f"input file {source} could not be read: Not a gzipped file")


@pytest.mark.asyncio
async def test_a_truncated_gzip_input_stops_with_one_line_and_exit_2_and_loses_no_answer(
    tmp_path: Path, server: MockServer
) -> None:
    whole = b"".join(
        b'{"messages": [{"role": "user", "content": "row %d mock:delay=0.02"}]}\n' % i
        for i in range(2000)
    )
    packed = gzip.compress(whole)
    source = tmp_path / "in.jsonl.gz"
    source.write_bytes(packed[: len(packed) * 3 // 4])
    command = [
        *("run", source, "--out", tmp_path / "o.jsonl", "--provider", "openai"),
        *("--base-url", server.base_url, "--no-progress"),
    ]

    done = await abatchrun(*command, OPENAI_API_KEY="sk-test")

    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert f"batchrun: error: input file {source} could not be read to its end" in stderr
    assert not (tmp_path / "o.jsonl").exists()
    sent = server.stats.requests
    assert 0 < sent < 2000
    # The rows in flight when the input broke were answered and kept: once
    # the input is whole, no row is sent twice.
    source.write_bytes(packed)
    again = await abatchrun(*command, OPENAI_API_KEY="sk-test")
    assert again.returncode == 0, again.stderr.decode()
    assert server.stats.requests == 2000
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 2000


@pytest.mark.asyncio
async def test_a_truncated_gzip_input_in_batch_mode_is_one_line_and_exit_2(
    tmp_path: Path, server: MockServer
) -> None:
    whole = b"".join(
        b'{"messages": [{"role": "user", "content": "row %d"}]}\n' % i for i in range(3000)
    )
    packed = gzip.compress(whole)
    source = tmp_path / "in.jsonl.gz"
    source.write_bytes(packed[: len(packed) * 3 // 4])

    line = await _refused(
        server,
        tmp_path,
        *("run", source, "--out", tmp_path / "o.jsonl", "--provider", "openai"),
        *("--base-url", server.base_url, "--mode", "batch", "--no-progress"),
    )

    assert line.startswith(f"input file {source} could not be read to its end")
    assert not server.batches.batches  # planning stopped before any part was submitted


@pytest.mark.asyncio
async def test_merge_refuses_to_write_over_a_shard_and_shards_of_another_job(
    tmp_path: Path, server: MockServer
) -> None:
    from batchrun.errors import UsageError

    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}") for i in range(6)])
    parts = []
    for i, (model, shard) in enumerate((("m-a", "0/2"), ("m-a", "1/2"), ("m-b", "1/2"))):
        config = make_config(
            tmp_path,
            [],
            server,
            input=source,
            out=tmp_path / f"p{i}.jsonl",
            model=model,
            shard=shard,
        )
        await run_async(config, clock=FakeClock().as_clock())
        parts.append(config.out)
    before = parts[0].read_bytes()
    server.stats.reset()

    line = await _refused(server, tmp_path, "merge", parts[0], parts[1], "--out", parts[0])

    assert line.startswith(f"--out {parts[0]} is also shard output {parts[0]}")
    assert parts[0].read_bytes() == before
    given = source.read_bytes()
    line = await _refused(server, tmp_path, "merge", parts[0], parts[1], "--out", source)
    assert line.startswith(f"--out {source} is also the shards' input")
    assert source.read_bytes() == given
    with pytest.raises(
        UsageError,
        match=r"the shards were run with different model \(shard 0/2: 'm-a', shard 1/2: 'm-b'\)",
    ):
        merge([parts[0], parts[2]], tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()
    assert len(read_jsonl(merge(parts[:2], tmp_path / "m.jsonl").output)) == 6


@pytest.mark.asyncio
async def test_an_output_without_its_state_is_replaced_only_with_restart(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a"), chat("b")])
    out = tmp_path / "o.jsonl"
    out.write_bytes(b"answers of another tool\n")
    args = ["run", source, "--out", out, "--provider", "openai", "--base-url", server.base_url]

    line = await _refused(server, tmp_path, *args, "--no-progress")

    assert line.startswith(f"--out {out} exists but has no state directory ({out}.batchrun)")
    assert out.read_bytes() == b"answers of another tool\n"
    assert not (tmp_path / "o.jsonl.batchrun").exists()
    done = await abatchrun(*args, "--no-progress", "--restart", OPENAI_API_KEY="sk-test")
    assert done.returncode == 0, done.stderr.decode()
    assert [row["custom_id"] for row in read_jsonl(out)] == ["line-1", "line-2"]


@pytest.mark.asyncio
async def test_a_full_disk_while_merging_exits_74_and_leaves_no_file(
    tmp_path: Path, server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import batchrun.merge as merge_module

    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}") for i in range(4)])
    parts = await run_shards(tmp_path, server, source, 2)

    def full(shards: object, partial: Path) -> tuple[int, int]:
        partial.write_bytes(b'{"id": "half a li')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge_module, "_interleave", full)
    merged = tmp_path / "m.jsonl"
    done = CliRunner().invoke(app, ["merge", *map(str, parts), "--out", str(merged)])

    assert done.exit_code == 74, done.output
    assert done.output.startswith(f"batchrun: error: cannot write {merged}: ")
    assert "(ENOSPC)" in done.output
    assert not merged.exists()
    assert not merged.with_name("m.jsonl.merging").exists()


@pytest.mark.asyncio
async def test_a_failed_metrics_write_warns_once_and_the_run_goes_on(
    tmp_path: Path, server: MockServer
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i} mock:delay=0.6") for i in range(20)])
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    done: list[subprocess.CompletedProcess[bytes]] = []

    async def run() -> None:
        done.append(
            await abatchrun(
                *("run", source, "--out", tmp_path / "o.jsonl", "--provider", "openai"),
                *("--base-url", server.base_url, "--no-progress"),
                *("--metrics-file", metrics_dir / "b.prom"),
                OPENAI_API_KEY="sk-test",
            )
        )

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        with anyio.fail_after(30):
            metrics = metrics_dir / "b.prom"
            while not (metrics.exists() and server.stats.requests):  # noqa: ASYNC110 - another process
                await anyio.sleep(0.02)
        shutil.rmtree(metrics_dir)  # every later write fails

    stderr = done[0].stderr.decode()
    assert done[0].returncode == 0, stderr
    assert "Traceback" not in stderr
    assert stderr.count("could not write the metrics file") == 1
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 20


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "command",
    [["status", "{long}"], ["validate", "{long}"], ["merge", "{long}", "--out", "{dir}/m.jsonl"]],
)
async def test_a_file_name_too_long_is_one_line_and_exit_2(
    command: list[str], tmp_path: Path, server: MockServer
) -> None:
    long = str(tmp_path / ("n" * 300))
    args = [part.format(long=long, dir=tmp_path) for part in command]

    line = await _refused(server, tmp_path, *args)

    assert line.startswith(f"File name too long: {long}")


# name -> (extra arguments of a run of b.jsonl into b-out.jsonl, with {a} (a
# finished run's output) and {bout} (b-out.jsonl) filled in; the refusal's start)
_OVER_A_RUN: dict[str, tuple[list[str], str]] = {
    "summary is another output": (
        ["--summary", "{a}"],
        "--summary {a} is the output of a batchrun",
    ),
    "metrics is another output": (
        ["--metrics-file", "{a}"],
        "--metrics-file {a} is the output of a batchrun run (its state is in {a}.batchrun)",
    ),
    "summary is a state file": (
        ["--summary", "{a}.batchrun/meta.json"],
        "--summary {a}.batchrun/meta.json is inside {a}.batchrun, an output's state directory",
    ),
    "summary is a result store": (
        ["--summary", "{a}.batchrun/results.sqlite"],
        "--summary {a}.batchrun/results.sqlite is inside {a}.batchrun",
    ),
    "metrics in a state dir": (
        ["--metrics-file", "{a}.batchrun/b.prom"],
        "--metrics-file {a}.batchrun/b.prom is inside {a}.batchrun",
    ),
    "summary in its own state dir": (
        ["--summary", "{bout}.batchrun/s.json"],
        "--summary {bout}.batchrun/s.json is inside {bout}.batchrun",
    ),
    "cache in a state dir": (
        ["--cache", "{a}.batchrun/cache"],
        "--cache {a}.batchrun/cache is inside {a}.batchrun",
    ),
    "cache is a state dir": (
        ["--cache", "{a}.batchrun"],
        "--cache {a}.batchrun: a name ending in .batchrun is an output's state directory",
    ),
    "out in a state dir": (
        ["--out", "{a}.batchrun/o.jsonl"],
        "--out {a}.batchrun/o.jsonl is inside {a}.batchrun",
    ),
}


def _fill_run(text: str, tmp_path: Path) -> str:
    return text.format(a=tmp_path / "a.jsonl", bout=tmp_path / "b-out.jsonl")


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every byte of ``out`` and of its state directory, by name."""
    files = [out, *sorted(out.with_name(out.name + ".batchrun").rglob("*"))]
    return {str(path): path.read_bytes() for path in files if path.is_file()}


async def _finished_output(tmp_path: Path, server: MockServer) -> Path:
    """``a.jsonl``, a finished run's output of ``in.jsonl``; the server's
    counts reset."""
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a"), chat("b")])
    config = make_config(tmp_path, [], server, input=source, out=tmp_path / "a.jsonl")
    await run_async(config, clock=FakeClock().as_clock())
    server.stats.reset()
    return config.out


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(_OVER_A_RUN))
async def test_a_run_never_writes_over_another_run_or_into_a_state_directory(
    case: str, tmp_path: Path, server: MockServer
) -> None:
    finished = await _finished_output(tmp_path, server)
    before = _snapshot(finished)
    write_jsonl(tmp_path / "b.jsonl", [chat("c")])
    extra, message = _OVER_A_RUN[case]
    args = ["run", tmp_path / "b.jsonl", "--out", tmp_path / "b-out.jsonl", "--no-progress"]

    line = await _refused(
        server,
        tmp_path,
        *args,
        *("--provider", "openai", "--base-url", server.base_url),
        *(_fill_run(a, tmp_path) for a in extra),
    )

    assert line.startswith(_fill_run(message, tmp_path)), line
    assert _snapshot(finished) == before
    assert not (tmp_path / "b-out.jsonl").exists()
    assert not (tmp_path / "b-out.jsonl.batchrun").exists()


@pytest.mark.asyncio
async def test_export_and_merge_never_write_over_another_run_or_into_its_state(
    tmp_path: Path, server: MockServer
) -> None:
    finished = await _finished_output(tmp_path, server)
    before = _snapshot(finished)
    shards = await run_shards(tmp_path, server, write_jsonl(tmp_path / "s.jsonl", [chat("x")]), 2)
    server.stats.reset()
    state = f"{finished}.batchrun"
    meta = f"{state}/meta.json"
    refusals = {
        ("export", shards[0], "--to", finished): f"--to {finished} is the output of a batchrun",
        ("export", finished, "--to", meta, "--format", "jsonl"): f"--to {meta} is inside {state}",
        ("merge", *shards, "--out", finished): f"--out {finished} is the output of a batchrun",
        ("merge", *shards, "--out", meta): f"--out {meta} is inside {state}",
    }
    _files_a_run_must_not_write(tmp_path)
    store, fifo = tmp_path / "c" / "results.sqlite", tmp_path / "null"
    refusals[("export", finished, "--to", store, "--format", "csv")] = (
        f"--to {store} is a SQLite database"
    )
    refusals[("export", finished, "--to", fifo, "--format", "csv")] = (
        f"--to {fifo} is not a regular file"
    )

    for args, message in refusals.items():
        assert (await _refused(server, tmp_path, *args)).startswith(message)

    assert _snapshot(finished) == before


@pytest.mark.asyncio
async def test_a_run_resumes_its_own_output_and_rewrites_its_own_summary_and_tables(
    tmp_path: Path, server: MockServer
) -> None:
    finished = await _finished_output(tmp_path, server)
    answers = finished.read_bytes()
    summary, table, merged = tmp_path / "s.json", tmp_path / "t.csv", tmp_path / "m.jsonl"
    args = ["run", tmp_path / "in.jsonl", "--out", finished, "--provider", "mock"]
    args += ["--base-url", server.base_url, "--no-progress", "--summary", summary]
    shards = await run_shards(tmp_path, server, write_jsonl(tmp_path / "s.jsonl", [chat("x")]), 2)
    server.stats.reset()

    for _ in range(2):  # the second time over the first one's summary, table and merge
        done = await abatchrun(*args, OPENAI_API_KEY="sk-test")
        assert done.returncode == 0, done.stderr.decode()
        done = await abatchrun("export", finished, "--to", table)
        assert done.returncode == 0, done.stderr.decode()
        assert merge(shards, merged).rows == 1

    assert finished.read_bytes() == answers
    assert server.stats.requests == 0
    assert orjson.loads(summary.read_bytes())["ok"] == 2
    assert table.read_text().count("\n") == 3


@pytest.mark.asyncio
@pytest.mark.parametrize("option", ["--summary", "--metrics-file"])
async def test_a_run_never_writes_over_an_unfinished_runs_output(
    option: str, tmp_path: Path, server: MockServer
) -> None:
    # A run not finished yet (live, stopped, or its OUT deleted to redo it) has
    # only its state: it publishes a.jsonl later, and a summary or metrics
    # file written there after that would replace its paid answers.
    finished = await _finished_output(tmp_path, server)
    finished.unlink()
    write_jsonl(tmp_path / "b.jsonl", [chat("c")])
    args = ["run", tmp_path / "b.jsonl", "--out", tmp_path / "b-out.jsonl", "--no-progress"]

    line = await _refused(
        server,
        tmp_path,
        *args,
        *("--provider", "openai", "--base-url", server.base_url, option, finished),
    )

    assert line.startswith(f"{option} {finished} is the output of a batchrun run"), line
    assert not finished.exists()


def test_only_a_state_directory_a_run_began_in_marks_an_unfinished_output(
    tmp_path: Path,
) -> None:
    # A run refused before its first row (--retry-failed on a new output, say)
    # leaves a state directory without meta.json: no run will publish there.
    begun, refused = tmp_path / "begun.jsonl", tmp_path / "refused.jsonl"
    (tmp_path / "begun.jsonl.batchrun").mkdir()
    (tmp_path / "begun.jsonl.batchrun" / "meta.json").write_text("{}")
    (tmp_path / "refused.jsonl.batchrun").mkdir()
    (tmp_path / "refused.jsonl.batchrun" / "lock").write_text("")

    with pytest.raises(UsageError, match="is the output of a batchrun run"):
        check_written([], [("--summary", begun)])
    check_written([], [("--summary", refused)])


def test_a_temporary_is_taken_over_when_left_and_refused_while_held(tmp_path: Path) -> None:
    # export and merge write one temporary per target: a killed command's is
    # taken over, a live one's is never written over or renamed away.
    to, fresh = tmp_path / "t.csv", tmp_path / ".t.csv.exporting"
    fresh.write_bytes(b"a killed export's piece")
    held = claim_temporary(fresh, to)
    try:
        with pytest.raises(UsageError, match=f"another batchrun command is writing {to} now"):
            claim_temporary(fresh, to)
    finally:
        os.close(held)
    again = claim_temporary(fresh, to)
    os.close(again)
