"""batchrun export and read_results: real runs on the mock, tables read back."""

from __future__ import annotations

import csv
import errno
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import batchrun.export as export_module
from batchrun import read_results, to_pandas
from batchrun.answers import read_answer
from batchrun.cli import app, stop_on_sigterm
from batchrun.errors import UsageError
from batchrun.export import export
from batchrun.mock.server import MockServer
from batchrun.results import COLUMNS, table_row
from batchrun.runner import Clock, run_async
from batchrun.state import StateDir, input_identity
from tests.conftest import chat, make_config, read_jsonl, write_jsonl
from tests.test_cli import batchrun

pytestmark = pytest.mark.timeout(30)


async def _mixed_run(tmp_path: Path, server: MockServer, clock: Clock) -> Path:
    rows = [
        chat("hello there", custom_id="a", topic="greeting", n=1),
        chat("always broken mock:fail=400", custom_id="b", topic="broken", n=2),
        {"custom_id": "c", "prompt": "complete me", "topic": "completion", "n": 3},
        chat("bye now", custom_id="d", topic="farewell", n=4),
    ]
    config = make_config(tmp_path, rows, server)
    summary = await run_async(config, clock=clock)
    assert summary.exit_code == 1
    return config.out


@pytest.mark.asyncio
async def test_chat_rows_and_a_failed_row_to_parquet_csv_and_jsonl(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    out = await _mixed_run(tmp_path, server, fake_clock)
    source = tmp_path / "in.jsonl"

    reports = [
        export(out, tmp_path / f"t.{ext}", input=source, columns=["topic", "n"])
        for ext in ("parquet", "csv", "jsonl")
    ]

    assert [(r.rows, r.failed) for r in reports] == [(4, 1)] * 3
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.column_names == [*COLUMNS, "topic", "n"]
    rows = table.to_pylist()
    assert [r["custom_id"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    assert rows[0]["text"] == "echo: hello there"
    assert rows[2]["text"] == "echo: complete me"
    assert rows[0]["finish_reason"] == "stop"
    assert (rows[0]["tokens_in"], rows[0]["tokens_out"]) == (2, 3)
    assert rows[1]["error_code"] == "invalid_request_error"
    assert rows[1]["text"] is None
    assert rows[0]["error_code"] is None
    assert [r["topic"] for r in rows] == ["greeting", "broken", "completion", "farewell"]
    assert [r["n"] for r in rows] == [1, 2, 3, 4]
    assert str(table.schema.field("n").type) == "int64"
    with (tmp_path / "t.csv").open(newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["text"] for r in csv_rows] == [
        "echo: hello there",
        "",
        "echo: complete me",
        "echo: bye now",
    ]
    assert csv_rows[1]["status"] == "failed"
    assert csv_rows[1]["error_message"] == "mock fault: HTTP 400"
    assert csv_rows[3]["topic"] == "farewell"
    assert read_jsonl(tmp_path / "t.jsonl") == rows


@pytest.mark.asyncio
async def test_embeddings_export_their_vectors(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [{"custom_id": f"e{i}", "input": f"text {i}", "model": "emb"} for i in range(3)]
    config = make_config(tmp_path, rows, server)
    assert (await run_async(config, clock=fake_clock)).exit_code == 0
    vectors = [r["response"]["body"]["data"][0]["embedding"] for r in read_jsonl(config.out)]

    export(config.out, tmp_path / "e.parquet")
    export(config.out, tmp_path / "e.csv")

    table = pq.read_table(tmp_path / "e.parquet")
    import pyarrow as pa

    assert table.schema.field("text").type.equals(pa.list_(pa.float64()))
    assert table.column("text").to_pylist() == vectors
    assert len(vectors[0]) == 8
    with (tmp_path / "e.csv").open(newline="") as handle:
        assert [orjson.loads(r["text"]) for r in csv.DictReader(handle)] == vectors


async def _dashscope_run(
    tmp_path: Path,
    server: MockServer,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    rows: list[dict[str, Any]],
) -> Path:
    """``rows`` run through the mock's DashScope dialect; the output's path."""
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-test")
    config = make_config(
        tmp_path, rows, server, provider="dashscope", base_url=server.dashscope_base_url
    )
    assert (await run_async(config, clock=clock)).exit_code == 0
    return config.out


@pytest.mark.asyncio
async def test_dashscope_native_answers(
    tmp_path: Path, server: MockServer, fake_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [
        chat("hello qwen", custom_id="q"),
        {"custom_id": "n", "input": {"messages": [{"role": "user", "content": "native one"}]}},
    ]
    out = await _dashscope_run(tmp_path, server, fake_clock, monkeypatch, rows)

    export(out, tmp_path / "d.parquet")

    rows_back = pq.read_table(tmp_path / "d.parquet").to_pylist()
    assert [r["text"] for r in rows_back] == ["echo: hello qwen", "echo: native one"]
    assert [r["finish_reason"] for r in rows_back] == ["stop", "stop"]
    assert (rows_back[1]["tokens_in"], rows_back[1]["tokens_out"]) == (2, 3)


@pytest.mark.asyncio
async def test_dashscope_embeddings_native_or_bare_give_the_same_vectors(
    tmp_path: Path, server: MockServer, fake_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [
        {"custom_id": "native", "model": "text-embedding-v3", "input": {"texts": ["a b", "c"]}},
        {"custom_id": "bare", "model": "text-embedding-v3", "input": ["a b", "c"]},
    ]
    out = await _dashscope_run(tmp_path, server, fake_clock, monkeypatch, rows)

    native, bare = read_results(out)
    assert native["status"] == bare["status"] == "ok"
    assert native["text"] == bare["text"]  # one vector per text, in input order
    assert len(native["text"]) == 2
    assert len(native["text"][0]) == 8
    assert native["tokens_in"] == 3


def test_dashscope_native_embeddings_and_text_answers_are_read() -> None:
    embeddings = {
        "output": {
            "embeddings": [
                {"text_index": 1, "embedding": [2.0]},
                {"text_index": 0, "embedding": [1.0]},
            ]
        }
    }
    text = {"output": {"text": "plain", "finish_reason": "length"}}

    assert read_answer(embeddings).vectors == [[1.0], [2.0]]
    assert read_answer(text).text == "plain"
    assert read_answer(text).finish_reason == "length"


def test_cost_and_parsed_columns_come_from_the_record() -> None:
    record: dict[str, Any] = {
        "line": 1,
        "custom_id": "x",
        "response": {"status_code": 200, "body": {"choices": []}},
        "error": None,
        "attempts": 1,
        "cost": 0.25,
        "parsed": {"name": "x", "n": 1},
    }

    row = table_row(record)

    assert row["cost"] == 0.25
    assert orjson.loads(row["parsed"]) == {"name": "x", "n": 1}
    assert table_row({**record, "cost": None, "parsed": None})["cost"] is None


def test_an_unfinished_output_is_refused_unless_partial(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    state = StateDir(out)
    state.root.mkdir()
    state.write_meta({"input": str(tmp_path / "in.jsonl")})
    done = orjson.dumps({"line": 1, "custom_id": "a", "error": None, "attempts": 1})
    state.partial_path.write_bytes(done + b"\n" + done[:5])  # a torn last line

    with pytest.raises(UsageError, match=r"has not finished.*--partial"):
        export(out, tmp_path / "t.csv")
    report = export(out, tmp_path / "t.csv", partial=True)

    assert report.rows == 1
    assert not list(tmp_path.glob(".t.csv*"))  # no temporary file left behind
    state.partial_path.unlink()  # as a batch run has it until its batches end
    with pytest.raises(UsageError, match=r"has written no row yet.*nothing to export so far"):
        export(out, tmp_path / "t.csv", partial=True)


def test_a_new_pass_exports_its_own_rows_not_the_last_passs_output(tmp_path: Path) -> None:
    # A new pass (an edited input, --retry-failed) runs over a finished
    # output: OUT is the last pass's, this pass's rows are in the partial output.
    out = tmp_path / "out.jsonl"
    old = {"line": 1, "custom_id": "old", "error": None, "attempts": 1}
    out.write_bytes(orjson.dumps(old) + b"\n" + orjson.dumps({**old, "line": 2}) + b"\n")
    source = write_jsonl(tmp_path / "in.jsonl", [chat("new", custom_id="new", tag="N1")])
    state = StateDir(out)
    state.root.mkdir()
    size, digest = input_identity(source)
    state.write_meta({"input": str(source), "input_size": size, "input_hash": digest})
    with pytest.raises(UsageError, match="has written no row yet"):
        export(out, tmp_path / "t.csv", partial=True, input=source, columns=["tag"])
    new = {"line": 1, "custom_id": "new", "error": None, "attempts": 1}
    state.partial_path.write_bytes(orjson.dumps(new) + b"\n")

    report = export(out, tmp_path / "t.csv", partial=True, input=source, columns=["tag"])

    assert report.rows == 1
    with (tmp_path / "t.csv").open() as table:
        (row,) = csv.DictReader(table)
    assert (row["custom_id"], row["tag"]) == ("new", "N1")


@pytest.mark.parametrize(
    ("line", "shown"), [('"x"', '"x"'), ("true", "true"), ("0", "0"), ("null", "null")]
)
def test_a_record_without_a_line_number_is_not_an_output(
    tmp_path: Path, line: str, shown: str
) -> None:
    out = tmp_path / "g.jsonl"
    out.write_text(f'{{"line": {line}, "custom_id": "a"}}\n')
    source = write_jsonl(tmp_path / "in.jsonl", [chat("q", tag="t")])
    for to in ("t.csv", "t.parquet"):
        done = CliRunner().invoke(
            app, ["export", str(out), "--to", str(tmp_path / to), "--input", str(source),
                  "--columns", "tag"],
        )  # fmt: skip
        assert done.exit_code == 2, done.output
        assert f"holds a record whose line is {shown}, not a line number" in done.output
        assert "Traceback" not in done.output


@pytest.mark.asyncio
async def test_parquet_without_pyarrow_names_the_extra(
    tmp_path: Path, server: MockServer, fake_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = await _mixed_run(tmp_path, server, fake_clock)
    monkeypatch.setitem(sys.modules, "pyarrow", None)

    with pytest.raises(UsageError, match=r"batchrun\[parquet\]"):
        export(out, tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()


@pytest.mark.asyncio
async def test_read_results_and_pandas(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    import pandas

    out = await _mixed_run(tmp_path, server, fake_clock)
    export(out, tmp_path / "t.parquet")

    streamed = read_results(out, input=tmp_path / "in.jsonl", columns=["topic"])
    frame = to_pandas(out)

    first = next(streamed)
    assert first["text"] == "echo: hello there"
    assert first["topic"] == "greeting"
    assert list(frame["status"]) == ["ok", "failed", "ok", "ok"]
    assert list(pandas.read_parquet(tmp_path / "t.parquet")["custom_id"]) == ["a", "b", "c", "d"]
    with pytest.raises(UsageError, match="--columns needs --input"):
        read_results(out, columns=["topic"])
    with pytest.raises(UsageError, match="--columns topic: named twice"):
        read_results(out, input=tmp_path / "in.jsonl", columns=["topic", "topic"])
    with pytest.raises(UsageError, match="columns is a list of field names, got the text 'topic'"):
        read_results(out, input=tmp_path / "in.jsonl", columns="topic")


def test_the_export_command(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}", tag=f"t{i}") for i in range(5)])
    out = tmp_path / "out.jsonl"
    assert batchrun("run", source, "--out", out, "--no-progress").returncode == 0

    done = batchrun(
        "export",
        out,
        "--to",
        tmp_path / "t.dat",
        "--format",
        "csv",
        "--input",
        source,
        "--columns",
        "tag",
    )
    unknown = batchrun("export", out, "--to", tmp_path / "t.xls")
    missing = batchrun("export", tmp_path / "nope.jsonl", "--to", tmp_path / "t.csv")

    assert done.returncode == 0, done.stderr
    assert "exported 5 rows (0 failed)" in done.stderr
    with (tmp_path / "t.dat").open(newline="") as handle:
        assert [r["tag"] for r in csv.DictReader(handle)] == [f"t{i}" for i in range(5)]
    assert unknown.returncode == 2
    assert "--format" in unknown.stderr
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr


@pytest.mark.asyncio
async def test_the_cost_column_holds_each_rows_cost(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    rows = [chat("one two three"), chat("four five")]
    config = make_config(
        tmp_path, rows, server, price_input_per_million=1.0, price_output_per_million=2.0
    )
    assert (await run_async(config, clock=fake_clock)).exit_code == 0
    costs = [record["cost"] for record in read_jsonl(config.out)]

    export(config.out, tmp_path / "c.parquet")

    assert all(cost > 0 for cost in costs)
    assert pq.read_table(tmp_path / "c.parquet").column("cost").to_pylist() == costs


@pytest.mark.asyncio
async def test_columns_come_only_from_the_input_the_run_read(
    tmp_path: Path, server: MockServer, fake_clock: Clock
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}", tag=f"t{i}") for i in range(3)])
    config = make_config(tmp_path, [], server, input=source)
    assert (await run_async(config, clock=fake_clock)).exit_code == 0
    other = write_jsonl(tmp_path / "other.jsonl", [chat(f"x{i}", tag=f"x{i}") for i in range(3)])

    with pytest.raises(UsageError, match=f"--input {other} is not the input the run on"):
        read_results(config.out, input=other, columns=["tag"])
    write_jsonl(source, [chat(f"r{i}", tag=f"edited {i}") for i in range(3)])  # edited since
    with pytest.raises(UsageError, match="its fields would be joined to the wrong rows"):
        read_results(config.out, input=source, columns=["tag"])
    assert [row["custom_id"] for row in read_results(config.out, input=other)] == [
        "line-1",
        "line-2",
        "line-3",
    ]  # no columns asked: the input is not read


# What a test's run leaves in its directory.
RUN_FILES = {"in.jsonl", "out.jsonl", "out.jsonl.batchrun"}


def _three_rows_run(tmp_path: Path) -> tuple[Path, Path]:
    """``in.jsonl`` (three chat rows) and ``out.jsonl``, its finished run's output."""
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"r{i}") for i in range(3)])
    out = tmp_path / "out.jsonl"
    assert batchrun("run", source, "--out", out, "--no-progress").returncode == 0
    return source, out


def test_export_refuses_to_write_where_it_must_not(tmp_path: Path) -> None:
    source, out = _three_rows_run(tmp_path)
    kept = {path: path.read_bytes() for path in (source, out)}
    (tmp_path / "adir").mkdir()
    cases = {
        "--input": ([source, "--input", source], f"--to {source} is also --input"),
        "OUT": ([out], f"--to {out} is also OUT"),
        "the run's input": ([source], f"--to {source} is also the input of OUT's run"),
        "a directory": ([tmp_path / "adir", "--format", "csv"], f"--to {tmp_path}/adir is a dir"),
        "a missing directory": ([tmp_path / "no" / "t.csv"], f"--to {tmp_path}/no/t.csv: the dir"),
        "standard output": (["-", "--format", "csv"], "--to -: batchrun writes a file"),
    }
    for name, (to, message) in cases.items():
        done = batchrun("export", out, "--to", *to)
        assert done.returncode == 2, name
        assert done.stderr.startswith(f"batchrun: error: {message}"), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
    assert {path: path.read_bytes() for path in kept} == kept
    assert not (tmp_path / "-").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adir",
        "in.jsonl",
        "out.jsonl",
        "out.jsonl.batchrun",
    ]


def test_a_full_disk_while_exporting_exits_74_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = _three_rows_run(tmp_path)

    def full(rows: Any, names: Any, path: Path) -> None:
        path.write_bytes(b"half a ta")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "write_csv", full)
    done = CliRunner().invoke(app, ["export", str(out), "--to", str(tmp_path / "t.csv")])

    assert done.exit_code == 74
    assert done.output.startswith(f"batchrun: error: cannot write {tmp_path / 't.csv'}: ")
    assert "(ENOSPC)" in done.output
    assert not done.exception or isinstance(done.exception, SystemExit)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl",
        "out.jsonl",
        "out.jsonl.batchrun",
    ]


def test_sigterm_midway_ends_an_export_as_ctrl_c_does_its_temporary_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default SIGTERM kills at once, leaving a hidden temporary as big as
    # the table beside it until another export to the same place.
    _, out = _three_rows_run(tmp_path)

    def terminated_midway(rows: Any, names: Any, path: Path) -> None:
        path.write_bytes(b"half a ta")
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1_000_000):  # the handler runs in this thread, between bytecodes
            pass
        raise AssertionError("SIGTERM did not end the export")

    monkeypatch.setattr(export_module, "write_csv", terminated_midway)
    previous = signal.getsignal(signal.SIGTERM)
    stop_on_sigterm()
    try:
        with pytest.raises(SystemExit) as stopped:
            export(out, tmp_path / "t.csv")
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert stopped.value.code == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl",
        "out.jsonl",
        "out.jsonl.batchrun",
    ]


@pytest.mark.asyncio
async def test_an_input_starting_with_a_byte_order_mark_joins_its_first_line(
    tmp_path: Path, server: MockServer
) -> None:
    source = tmp_path / "bom.jsonl"
    lines = [chat("hi", custom_id="a", topic="t1"), chat("yo", custom_id="b", topic="t2")]
    source.write_bytes(b"\xef\xbb\xbf" + b"".join(orjson.dumps(x) + b"\n" for x in lines))
    config = make_config(tmp_path, [], server, input=source)
    assert (await run_async(config)).exit_code == 0

    rows = list(read_results(config.out, input=source, columns=["topic"]))

    assert [row["topic"] for row in rows] == ["t1", "t2"]


def test_an_export_killed_midway_leaves_nothing_after_the_next_export(tmp_path: Path) -> None:
    """SIGKILL skips ``finally``: the piece a killed export wrote must not stay beside
    --to for good (each export used to name it by its process id)."""
    import os
    import signal
    import subprocess

    _, out = _three_rows_run(tmp_path)
    to = tmp_path / "t.csv"
    killed = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "import batchrun.export as e\n"
        "def dying(rows, names, path):\n"
        "    path.write_bytes(b'half a ta')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "e.write_csv = dying\n"
        "e.export(Path(sys.argv[1]), Path(sys.argv[2]))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", killed, str(out), str(to)], env=env, timeout=60)
    assert done.returncode == -signal.SIGKILL

    export(out, to)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl", "out.jsonl", "out.jsonl.batchrun", "t.csv",
    ]  # fmt: skip


def test_parquet_row_groups_are_bounded_in_bytes_not_only_in_rows(tmp_path: Path) -> None:
    # 40 answers of 1 MiB: 8,192 rows a group would hold them all in memory at
    # once (and 8 GiB for 8,192 such rows); a group must stop at about
    # GROUP_BYTES of values instead.
    big = "x" * (1 << 20)
    rows = [
        {**dict.fromkeys(COLUMNS), "line": n, "custom_id": f"r{n}", "status": "ok", "text": big}
        for n in range(1, 41)
    ]
    path = tmp_path / "t.parquet"

    export_module.write_parquet(iter(rows), COLUMNS, path)

    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 40
    assert meta.num_row_groups >= 2
    most = max(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    assert most * len(big) <= export_module.GROUP_BYTES + len(big)
    assert pq.read_table(path).column("line").to_pylist() == list(range(1, 41))


def test_a_second_export_to_the_same_place_never_publishes_a_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Export A is writing its temporary when export B to the same --to starts.
    # B used to remove A's temporary and write its own under the same name; A
    # then renamed B's half-written file onto --to and said it had exported
    # everything, and B's rename found nothing (exit 70, a traceback).
    _, out = _three_rows_run(tmp_path)
    to = tmp_path / "t.csv"
    real = export_module.write_csv
    second: list[BaseException | None] = []

    def interrupted(rows: Any, names: Any, path: Path) -> None:
        with path.open("wb") as handle:  # A holds its file open, as every writer does
            monkeypatch.setattr(export_module, "write_csv", real)
            try:
                export(out, to)  # B starts while A writes
            except UsageError as exc:
                second.append(exc)
            else:
                second.append(None)
            scratch = tmp_path / "scratch"
            real(rows, names, scratch)
            handle.write(scratch.read_bytes())
            scratch.unlink()

    monkeypatch.setattr(export_module, "write_csv", interrupted)
    report = export(out, to)

    assert report.rows == 3
    assert isinstance(second[0], UsageError)  # B is refused, A's file is whole
    assert "another batchrun command is writing" in str(second[0])
    assert len(to.read_bytes().splitlines()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl", "out.jsonl", "out.jsonl.batchrun", "t.csv",
    ]  # fmt: skip
