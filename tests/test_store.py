"""The content key (pure) and the SQLite result store (real files)."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batchrun.store
from batchrun import reuse
from batchrun.contentkey import canonical_json, content_key, json_key, request_key
from batchrun.providers import get_provider
from batchrun.records import Defaults, Request, parse_line
from batchrun.reuse import open_answers
from batchrun.store import STORE_FILE, ResultStore, Stored, StoreError, open_store, store_row

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6))
def test_the_key_ignores_key_order(body: dict[str, Any]) -> None:
    reversed_body = dict(reversed(list(body.items())))
    assert content_key("openai", "/v1/x", body) == content_key("openai", "/v1/x", reversed_body)


@given(
    st.sampled_from(["openai", "dashscope", 'odd"name']),
    st.text(max_size=12),
    st.dictionaries(st.text(max_size=6), json_values, max_size=6),
)
def test_the_key_from_the_bodys_json_is_the_content_key(
    dialect: str, endpoint: str, body: dict[str, Any]
) -> None:
    """Batch mode keys a row from the JSON its batch line holds: the same key."""
    assert json_key(dialect, endpoint, canonical_json(body)) == content_key(dialect, endpoint, body)


def test_canonical_json_sorts_keys_without_whitespace() -> None:
    assert canonical_json({"b": 1, "a": {"d": 2, "c": [1, 2]}}) == b'{"a":{"c":[1,2],"d":2},"b":1}'


def _request(raw: bytes, line: int, defaults: Defaults | None = None) -> Request:
    parsed = parse_line(raw, line, defaults or Defaults())
    assert isinstance(parsed, Request)
    return parsed


def test_the_key_ignores_line_and_custom_id_but_not_what_is_sent() -> None:
    openai = get_provider("openai")
    body = b'{"messages":[{"role":"user","content":"hi"}]'
    first = _request(body + b',"custom_id":"a"}', 1)
    moved = _request(body + b',"custom_id":"b"}', 9)
    edited = _request(b'{"messages":[{"role":"user","content":"hi!"}]}', 1)
    assert request_key(openai, first) == request_key(openai, moved)
    assert request_key(openai, first) != request_key(openai, edited)


def test_the_key_covers_defaults_dialect_and_endpoint() -> None:
    openai, dashscope = get_provider("openai"), get_provider("dashscope")
    raw = b'{"messages":[{"role":"user","content":"hi"}]}'
    plain = _request(raw, 1)
    with_model = _request(raw, 1, Defaults(model="m"))
    with_param = _request(raw, 1, Defaults(model="m", params={"temperature": 0}))
    keys = {
        request_key(openai, plain),
        request_key(openai, with_model),
        request_key(openai, with_param),
        request_key(dashscope, with_param),
    }
    assert len(keys) == 4
    embedding = _request(b'{"input":"hi"}', 1)
    assert request_key(openai, embedding) != content_key(
        "openai", "/v1/chat/completions", {"input": "hi"}
    )


def _stored(text: str, *, ok: bool = True, retryable: bool = False, created: float = 1.0) -> Stored:
    return Stored(record=text.encode(), ok=ok, retryable=retryable, cost=0.5, created=created)


def _record(store: ResultStore, key: bytes) -> bytes | None:
    found = store.get(key)
    return None if found is None else found.record


def test_put_get_and_the_replace_rule(tmp_path: Path) -> None:
    store = open_store(tmp_path / "c" / STORE_FILE)
    assert store.is_empty()
    store.put_many([(b"k1", _stored("transient", ok=False, retryable=True))])
    store.put_many([(b"k1", _stored("answer"))])
    store.put_many([(b"k1", _stored("later transient", ok=False, retryable=True))])
    found = store.get(b"k1")
    assert found is not None
    assert found.record == b"answer"
    assert found.cost == 0.5
    assert store.get(b"k2") is None
    assert not store.is_empty()
    store.close()


def test_a_new_store_takes_large_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    made = open_store(tmp_path / "new" / STORE_FILE)
    made.close()
    old = tmp_path / "old" / STORE_FILE
    old.parent.mkdir()
    with contextlib.closing(sqlite3.connect(old)) as db:  # a store of an earlier release
        db.execute("CREATE TABLE t (x)")
        db.execute("DROP TABLE t")
    reopened = open_store(old)
    reopened.put_many([(b"k1", _stored("answer"))])
    reopened.close()

    def page_size(path: Path) -> int:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return int(db.execute("PRAGMA page_size").fetchone()[0])

    assert page_size(tmp_path / "new" / STORE_FILE) == batchrun.store.PAGE_BYTES == 8192
    assert page_size(old) == 4096


def test_rows_of_one_commit_are_put_in_their_order_under_one_key(tmp_path: Path) -> None:
    store = open_store(tmp_path / "c" / STORE_FILE)
    store.put_rows(
        [
            store_row(b"k2", _stored("first")),
            store_row(b"k1", _stored("other")),
            store_row(b"k2", _stored("second")),
            store_row(b"k2", _stored("a transient", ok=False, retryable=True)),
        ]
    )
    found = store.get(b"k2")
    assert found is not None
    assert found.record == b"second"
    assert found.ok
    store.close()


def test_another_programs_database_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (x)")
    refusal = r"is not a batchrun result store \(it holds other tables: notes\)"
    with pytest.raises(StoreError, match=refusal):
        open_store(path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master")]
    assert tables == ["notes"]


def test_stats_and_prune(tmp_path: Path) -> None:
    store = open_store(tmp_path / STORE_FILE)
    store.put_many([(b"old", _stored("a", created=100.0)), (b"new", _stored("b", created=1000.0))])
    store.put_many([(b"bad", _stored("c", ok=False, created=1000.0))])
    stats = store.stats()
    assert (stats.results, stats.ok, stats.errors, stats.cost) == (3, 2, 1, 1.5)
    assert (stats.oldest, stats.newest) == (100.0, 1000.0)
    assert store.prune(500.0, now=1100.0) == 1
    assert store.get(b"old") is None
    assert store.get(b"new") is not None
    store.close()


def test_a_file_that_is_not_a_database_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=str(path)):
        open_store(path)


def test_a_place_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create"):
        open_store(blocker / "cache" / STORE_FILE)


def _writer(path: str, start: int) -> None:
    store = open_store(Path(path))
    for batch in range(20):
        store.put_many([(f"{start}-{batch}-{i}".encode(), _stored(f"r{i}")) for i in range(50)])
    store.close()


def test_two_processes_write_one_store_at_once(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    open_store(path).close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(str(path), n)) for n in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    store = open_store(path)
    assert store.stats().results == 2 * 20 * 50
    store.close()


def test_a_store_another_process_is_making_is_waited_for_not_called_damaged(
    tmp_path: Path,
) -> None:
    # The other process has just made the file and holds its write lock, as
    # the winner of two runs opening one new cache does while it switches the
    # file to WAL: the switch here fails at once, the busy timeout not waiting.
    path = tmp_path / STORE_FILE
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the holder finishes during the first wait
        waits.append(seconds)
        holder.execute("COMMIT")

    store = open_store(path, sleep=sleep)

    assert len(waits) == 1
    assert store.is_empty()
    store.close()
    holder.close()


def test_a_store_locked_past_the_busy_timeout_is_called_locked_not_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / STORE_FILE
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(batchrun.store, "_OPEN_ATTEMPTS", 3)

    with pytest.raises(StoreError, match="stayed locked") as caught:
        open_store(path, sleep=lambda _: None)

    assert "is damaged" not in str(caught.value)
    holder.close()


@contextlib.contextmanager
def _as_another_user() -> Iterator[None]:
    """Permissions bind root only through another user: act as nobody for a moment."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.parametrize("existing", [True, False])
def test_a_read_only_directory_is_refused(existing: bool) -> None:
    directory = Path(tempfile.mkdtemp(prefix="batchrun-ro-"))  # traversable by nobody
    try:
        directory.chmod(0o755)
        path = directory / STORE_FILE
        if existing:
            open_store(path).close()
            path.chmod(0o444)
        directory.chmod(0o555)
        with _as_another_user(), pytest.raises(StoreError, match=f"cannot write .*{path}"):
            open_store(path)
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"a", b"b"]), st.booleans()), max_size=12))
def test_a_transient_error_never_replaces_a_lasting_result(puts: list[tuple[bytes, bool]]) -> None:
    """Model: the last non-retryable result wins; a retryable one only fills a
    gap or replaces another retryable one."""
    directory = Path(tempfile.mkdtemp(prefix="batchrun-prop-"))
    try:
        store = open_store(directory / STORE_FILE, durable=False)
        model: dict[bytes, tuple[str, bool]] = {}
        for number, (key, retryable) in enumerate(puts):
            text = f"r{number}"
            store.put_many([(key, _stored(text, ok=not retryable, retryable=retryable))])
            if key not in model or model[key][1] or not retryable:
                model[key] = (text, retryable)
        for key, (text, retryable) in model.items():
            found = store.get(key)
            assert found is not None
            assert (found.record.decode(), found.retryable) == (text, retryable)
        store.close()
    finally:
        shutil.rmtree(directory)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([b"a", b"b", b"c", b"d"]), st.booleans()),
        min_size=1,
        max_size=3 * batchrun.store.ROWS_PER_STATEMENT,
    )
)
def test_one_put_of_many_rows_keeps_the_replace_rule(puts: list[tuple[bytes, bool]]) -> None:
    """Many rows in one call go in statements of many rows: within a statement
    and across them, the same rule holds as for one put at a time."""
    directory = Path(tempfile.mkdtemp(prefix="batchrun-prop-"))
    try:
        store = open_store(directory / STORE_FILE, durable=False)
        model: dict[bytes, tuple[str, bool]] = {}
        rows = []
        for number, (key, retryable) in enumerate(puts):
            text = f"r{number}"
            rows.append(store_row(key, _stored(text, ok=not retryable, retryable=retryable)))
            if key not in model or model[key][1] or not retryable:
                model[key] = (text, retryable)
        store.put_rows(rows)
        for key, (text, retryable) in model.items():
            found = store.get(key)
            assert found is not None
            assert (found.record.decode(), found.retryable) == (text, retryable)
        assert store.stats().results == len(model)
        store.close()
    finally:
        shutil.rmtree(directory)


def test_the_budget_reserves_settles_and_refuses() -> None:
    from batchrun.budget import Budget

    budget = Budget(cap=10.0, spent=2.0)
    assert budget.reserve(5.0)
    assert not budget.reserve(9.0)  # 2 spent + 9 > 10, even once the 5 reserved settle
    assert budget.refused
    budget.settle(5.0, 1.5)
    assert (budget.spent, budget.reserved, budget.holding) == (3.5, 0.0, 0)
    assert budget.reserve(6.5)
    budget.release(6.5)
    assert budget.reserved == 0.0
    assert Budget(cap=None).reserve(1e12)


def test_the_journal_pairs_results_with_their_keys(tmp_path: Path) -> None:
    from batchrun.journal import Journal, read_journal

    journal = Journal(tmp_path / "journal")
    journal.open()
    journal.begin(1)
    journal.record(b'{"id":"batch_req_1","line":1}\n', line=1, key=b"\x01" * 32)
    journal.record(b'{"id":"batch_req_2","line":2}\n')  # a bad line's record: no key
    journal.close()
    with (tmp_path / "journal").open("ab") as handle:
        handle.write(b'{"k":"' + b"02" * 32 + b'","l":3}\n{"id":"batch_req_3","li')  # torn

    contents = read_journal(tmp_path / "journal", after_line=0)

    assert contents.keyed == [(b"\x01" * 32, b'{"id":"batch_req_1","line":1}\n')]
    assert sorted(contents.results) == [1, 2]


def test_a_torn_wal_tail_loses_only_the_last_transaction(tmp_path: Path) -> None:
    """A copy of a store taken mid-run, its WAL cut inside the last commit: the
    state a kill or a power loss leaves. SQLite drops the torn transaction."""
    live = tmp_path / "live"
    store = open_store(live / STORE_FILE, durable=False)
    store.put_many([(b"first", _stored("one"))])
    store.put_many([(b"second", _stored("two" * 500))])
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (STORE_FILE, STORE_FILE + "-wal"):
        shutil.copyfile(live / name, copy / name)  # copied while open: the WAL is not merged
    store.close()
    wal = copy / (STORE_FILE + "-wal")
    wal.write_bytes(wal.read_bytes()[:-700])

    torn = open_store(copy / STORE_FILE)

    assert torn.get(b"first") is not None
    assert torn.get(b"second") is None
    torn.close()


def test_buffered_results_are_committed_once_they_pass_a_few_megabytes(tmp_path: Path) -> None:
    # Large answers must not pile up in the commit buffer between the
    # pipeline's timer flushes: they would sit outside --reorder-bytes.
    answers = open_answers(tmp_path, None, resend_retryable=False)
    big = _stored("x" * (reuse.FLUSH_BYTES // 4))
    for n in range(3):
        answers.add(b"k%d" % n, big)
    assert answers.local.is_empty()  # under the bound: buffered
    answers.add(b"k3", big)
    assert answers.local.get(b"k0") is not None  # past it: committed at once
    assert answers.local.get(b"k3") is not None
    answers.close()


def test_rows_put_sorted_go_to_both_stores_after_the_buffered_ones(tmp_path: Path) -> None:
    answers = open_answers(tmp_path / "out", tmp_path / "cache", resend_retryable=False)
    answers.add(b"k1", _stored("buffered"))
    rows = [
        store_row(b"k1", _stored("later")),
        store_row(b"k2", _stored("transient", ok=False, retryable=True)),
    ]
    answers.put_sorted(lambda: iter(rows))
    assert answers.cache is not None
    for store in (answers.local, answers.cache):
        found = store.get(b"k1")
        assert found is not None
        assert found.record == b"later"  # the buffered result went first
    assert answers.local.get(b"k2") is not None
    assert answers.cache.get(b"k2") is None  # no retryable error is shared
    answers.close()


@given(st.integers(min_value=1, max_value=batchrun.store.ROWS_PER_STATEMENT))
def test_a_chunk_goes_in_statements_of_powers_of_two(rows: int) -> None:
    statements = list(batchrun.store._statements(rows))
    assert [start for start, _ in statements] == list(
        itertools.accumulate([size for _, size in statements][:-1], initial=0)
    )
    assert sum(size for _, size in statements) == rows
    sizes = [size for _, size in statements]
    assert all(size & (size - 1) == 0 for size in sizes)
    assert sizes == sorted(set(sizes), reverse=True)  # so at most 8 statements


def test_a_short_put_takes_a_few_statements_not_one_per_row(tmp_path: Path) -> None:
    store = open_store(tmp_path / STORE_FILE, durable=False)
    inserts: list[str] = []
    store._db.set_trace_callback(
        lambda sql: inserts.append(sql) if sql.lstrip().startswith("INSERT") else None
    )
    rows = [store_row(b"k%03d" % n, _stored(f"r{n}")) for n in range(57)]
    store.put_rows(rows)
    store._db.set_trace_callback(None)
    assert len(inserts) == 4  # 32 + 16 + 8 + 1
    assert store.stats().results == 57
    store.close()


def test_new_rows_are_inserted_without_an_upsert_and_stored_ones_take_it(
    tmp_path: Path,
) -> None:
    """Rows whose keys are new go in by an insert that cannot fail half-way
    (so SQLite keeps no statement journal for it); only a statement that met
    a stored key is followed by the upsert, which applies the replace rule."""
    store = open_store(tmp_path / STORE_FILE, durable=False)
    store.put_many(
        [
            (b"k050", _stored("lasting", ok=False)),
            (b"k051", _stored("flaky", ok=False, retryable=True)),
            (b"k052", _stored("kept")),
        ]
    )
    inserts: list[str] = []
    store._db.set_trace_callback(
        lambda sql: (
            inserts.append(sql.split("VALUES")[0].split()[1])
            if sql.lstrip().startswith("INSERT")
            else None
        )
    )
    rows = [store_row(b"k%03d" % n, _stored(f"r{n}")) for n in range(48)]
    rows += [store_row(b"k%03d" % n, _stored(f"r{n}")) for n in (50, 51)]
    rows.append(store_row(b"k052", _stored("r52", ok=False, retryable=True)))
    store.put_rows(rows)
    store._db.set_trace_callback(None)
    # 32 + 16 new rows; then 2 and 1 rows of stored keys, each statement upserted
    assert inserts == ["OR", "OR", "OR", "INTO", "OR", "INTO"]
    assert store.stats().results == 51
    assert [_record(store, key) for key in (b"k000", b"k050", b"k051", b"k052")] == [
        b"r0",
        b"r50",  # an answer replaces a lasting error
        b"r51",  # and a transient one
        b"kept",  # a transient error replaces no answer
    ]
    store.close()


def test_a_file_the_store_cannot_open_is_not_called_damaged(tmp_path: Path) -> None:
    """Out of open files (or a directory gone), SQLite cannot open a file it
    needs: the message names the likely causes and does not tell the user to
    throw the store, and its paid results, away."""
    error = sqlite3.OperationalError("unable to open database file")
    error.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN  # as the sqlite3 module sets it
    mapped = batchrun.store._damaged(tmp_path / STORE_FILE, error)
    assert isinstance(mapped, StoreError)
    assert "ulimit -n" in str(mapped)
    assert "damaged" not in str(mapped)
    assert "--restart" not in str(mapped)
