"""Tests of batchrun.validate: the dry run's counts, examples, estimates and verdict."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchrun.config import RunConfig
from batchrun.errors import UsageError
from batchrun.jobfile import build_config
from batchrun.records import Defaults, Request, parse_line
from batchrun.tokens import DEFAULT_MAX_OUTPUT, estimate_input_tokens, estimate_output_tokens
from batchrun.validate import EXAMPLES, ValidationReport, validate
from tests.conftest import chat, write_jsonl


def config_for(path: Path, **settings: Any) -> RunConfig:
    return build_config({"input": path, "out": path.with_name("out.jsonl"), **settings})


def check(tmp_path: Path, rows: list[dict[str, Any] | bytes], **settings: Any) -> ValidationReport:
    return validate(config_for(write_jsonl(tmp_path / "in.jsonl", rows), **settings))


def batch_line(custom_id: str, *, url: str = "/v1/chat/completions", **extra: Any) -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": chat("hi"), **extra}
    return orjson.dumps(line)


BAD_LINES: list[tuple[bytes, str]] = [
    (b"", "blank line"),
    (b"   \t ", "blank line"),
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got array"),
    (
        b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 300 + b"]" * 300 + b"}",
        "nested too deeply",
    ),
    (b"\xff\xfe", "not UTF-8 text"),
    (b'{"temperature": 0.5}', "no recognisable request"),
    (batch_line("bad-url", url="/v1/nope"), "url must be one of"),
    (batch_line("get", method="GET"), "method must be POST, got 'GET'"),
]


def test_every_kind_of_bad_line_is_counted_with_its_line_and_reason(tmp_path: Path) -> None:
    rows: list[dict[str, Any] | bytes] = [chat("first")]
    rows += [raw for raw, _ in BAD_LINES]
    rows.append(chat("last"))
    report = check(tmp_path, rows)
    assert (report.rows, report.valid, report.malformed) == (2 + len(BAD_LINES), 2, len(BAD_LINES))
    assert [line for line, _ in report.malformed_examples] == list(range(2, 2 + len(BAD_LINES)))
    for (_, reason), (_, expected) in zip(report.malformed_examples, BAD_LINES, strict=True):
        assert expected in reason
        assert not reason.startswith("line ")  # the line number is the tuple's
    assert report.would_fail


def test_crlf_line_endings_are_not_part_of_the_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(orjson.dumps(chat("a")) + b"\r\n" + orjson.dumps(chat("b")) + b"\r\n")
    report = validate(config_for(path))
    assert (report.rows, report.valid, report.malformed) == (2, 2, 0)


def test_examples_are_capped_but_counts_are_not(tmp_path: Path) -> None:
    report = check(tmp_path, [b"nope"] * (EXAMPLES + 10))
    assert report.malformed == EXAMPLES + 10
    assert len(report.malformed_examples) == EXAMPLES
    assert report.malformed_examples[-1][0] == EXAMPLES
    assert f"malformed (first {EXAMPLES}):" in report.render()


def test_duplicates_count_repeats_of_custom_id_and_id(tmp_path: Path) -> None:
    rows: list[dict[str, Any] | bytes] = [
        chat("1", custom_id="x"),
        chat("2", custom_id="y"),
        chat("3", id="x"),  # id and custom_id share one namespace, as in the output
        chat("4"),
        batch_line("y"),
        chat("6", custom_id="x"),
        chat("7", id=7),
        chat("8", custom_id="7"),
        chat("9"),
    ]
    report = check(tmp_path, rows)
    assert report.duplicate_ids == 4
    assert report.duplicate_examples == [(3, "x", 1), (5, "y", 2), (6, "x", 1), (8, "7", 7)]
    assert not report.would_fail  # a repeated id is ambiguous, not an error
    assert "line 3: 'x' first on line 1" in report.render()


def test_an_explicit_id_that_names_another_lines_own_id_is_a_duplicate(
    tmp_path: Path,
) -> None:
    # Line 2 has no id and gets "line-2", which lines 4 and 5 give explicitly;
    # line 3 gives "line-6" before line 6 (no id) gets it.
    rows: list[dict[str, Any] | bytes] = [
        chat("1", custom_id="line-1"),  # its own: fine
        chat("2"),
        chat("3", custom_id="line-6"),
        chat("4", custom_id="line-2"),
        chat("5", custom_id="line-2"),
        chat("6"),
        chat("7", custom_id="line-07"),  # not the id line 7 would get
    ]
    report = check(tmp_path, rows)
    assert report.duplicate_examples == [(4, "line-2", 2), (5, "line-2", 2), (6, "line-6", 3)]
    assert report.duplicate_ids == 3


def test_lines_without_ids_are_never_duplicates(tmp_path: Path) -> None:
    report = check(tmp_path, [chat("same"), chat("same"), b"", b""])
    assert report.duplicate_ids == 0


def test_malformed_line_with_an_explicit_id_still_takes_the_id(tmp_path: Path) -> None:
    # Its error record carries the id, so a later row with it is ambiguous too.
    report = check(tmp_path, [batch_line("k", url="/v1/nope"), chat("ok", custom_id="k")])
    assert (report.malformed, report.duplicate_ids) == (1, 1)
    assert report.duplicate_examples == [(2, "k", 1)]


def test_endpoints_and_models_with_job_defaults(tmp_path: Path) -> None:
    rows: list[dict[str, Any] | bytes] = [
        chat("a"),
        chat("b", model="other"),
        {"prompt": "complete me"},
        {"input": "embed me"},
        {"input": {"messages": [{"role": "user", "content": "native"}]}},
        batch_line("e", url="/v1/embeddings", body={"input": "embed me too"}),
        b"broken",
    ]
    report = check(tmp_path, rows, model="job-model")
    assert report.endpoints == {"chat": 2, "embeddings": 2, "completions": 1, "dashscope": 1}
    assert report.models == {"job-model": 5, "other": 1}
    assert list(report.endpoints) == ["chat", "embeddings", "completions", "dashscope"]


def test_rows_without_any_model_count_as_none(tmp_path: Path) -> None:
    report = check(tmp_path, [chat("a"), chat("b", model="m")])
    assert report.models == {"(none)": 1, "m": 1}


def test_token_and_cost_estimates_match_the_token_functions(tmp_path: Path) -> None:
    rows: list[dict[str, Any] | bytes] = [
        chat("a short prompt"),
        chat("x" * 401, max_tokens=1000),
        chat("漢字とかなの文章です"),
        {"prompt": ["complete one", "complete two"]},
        {"input": {"messages": [{"role": "user", "content": "native"}]}, "parameters": {}},
        b"not a request",
    ]
    params = {"max_tokens": 64}
    report = check(
        tmp_path,
        rows,
        model="m",
        params=params,
        price_input_per_million=0.8,
        price_output_per_million=3.2,
    )
    defaults = Defaults(model="m", params=params)
    bodies = [
        parsed.body
        for n, raw in enumerate((tmp_path / "in.jsonl").read_bytes().splitlines(), start=1)
        if isinstance(parsed := parse_line(raw, n, defaults), Request)
    ]
    tokens_in = sum(map(estimate_input_tokens, bodies))
    tokens_out = sum(map(estimate_output_tokens, bodies))
    assert (report.input_tokens, report.max_output_tokens) == (tokens_in, tokens_out)
    # Job params fill max_tokens where a row has none.
    assert tokens_out == 64 + 1000 + 64 + 64 + 64
    assert report.estimated_cost == pytest.approx(tokens_in / 1e6 * 0.8 + tokens_out / 1e6 * 3.2)


def test_a_batch_job_is_estimated_at_the_batch_price(tmp_path: Path) -> None:
    prices = {"price_input_per_million": 0.8, "price_output_per_million": 3.2}
    rows: list[dict[str, Any] | bytes] = [chat("a short prompt", max_tokens=100)] * 3
    online = check(tmp_path, rows, model="m", **prices)
    batch = check(tmp_path, rows, model="m", mode="batch", **prices)
    quarter = check(tmp_path, rows, model="m", mode="batch", batch_price_share=0.25, **prices)

    assert online.estimated_cost is not None
    assert batch.estimated_cost == pytest.approx(online.estimated_cost / 2)
    assert quarter.estimated_cost == pytest.approx(online.estimated_cost / 4)
    assert "(batch price)" in batch.render()
    assert "(batch price)" not in online.render()
    assert batch.to_dict()["batch_price"] is True


def test_cost_is_unknown_without_both_prices(tmp_path: Path) -> None:
    report = check(tmp_path, [chat("a")], price_input_per_million=0.8)
    assert report.estimated_cost is None
    assert "cost unknown" in report.render()


def test_rows_over_the_context_limit(tmp_path: Path) -> None:
    rows: list[dict[str, Any] | bytes] = [
        chat("hi"),  # 1 + DEFAULT_MAX_OUTPUT
        chat("y" * 200),  # 50 + DEFAULT_MAX_OUTPUT
        {"input": "z" * 2000},  # 500, and embeddings allow no output
        chat("w" * 40, max_tokens=10),
    ]
    report = check(tmp_path, rows, context_limit=300)
    assert DEFAULT_MAX_OUTPUT == 256  # the arithmetic above assumes it
    assert report.over_context == 2
    assert report.over_context_examples == [(2, 306), (3, 500)]
    assert report.would_fail
    assert "line 3: ~500 tokens" in report.render()


def test_no_context_limit_means_nothing_is_over(tmp_path: Path) -> None:
    report = check(tmp_path, [chat("y" * 100_000)])
    assert (report.over_context, report.over_context_examples) == (0, [])


def test_clean_file_would_not_fail(tmp_path: Path) -> None:
    report = check(tmp_path, [chat(f"row {n}", custom_id=f"r{n}") for n in range(5)])
    assert (report.rows, report.valid, report.malformed, report.duplicate_ids) == (5, 5, 0, 0)
    assert not report.would_fail
    assert report.render().endswith("verdict: ok")


def test_shard_sees_only_its_rows(tmp_path: Path) -> None:
    rows: list[dict[str, Any] | bytes] = [
        chat("row 0", custom_id="a"),
        b"bad row 1",
        b"bad row 2",
        chat("row 3", custom_id="a"),
        chat("row 4"),
        chat("row 5", custom_id="a"),
    ]
    report = check(tmp_path, rows, shard="1/2")
    assert (report.rows, report.valid, report.malformed) == (3, 2, 1)
    assert report.malformed_examples[0][0] == 2
    # Row 0 is another shard's, so line 4 is this shard's first "a".
    assert report.duplicate_examples == [(6, "a", 4)]
    whole = check(tmp_path, rows)
    assert (whole.rows, whole.malformed, whole.duplicate_ids) == (6, 2, 2)


def test_gzipped_input_gives_the_same_report(tmp_path: Path) -> None:
    rows: list[dict[str, Any] | bytes] = [chat("a", custom_id="q"), b"", chat("b", custom_id="q")]
    plain = check(tmp_path, rows)
    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress((tmp_path / "in.jsonl").read_bytes()))
    report = validate(config_for(packed))
    assert report.to_dict() | {"input": plain.input} == plain.to_dict()
    assert report.input == str(packed)


def test_missing_or_unreadable_input_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        validate(config_for(tmp_path / "missing.jsonl"))
    corrupt = tmp_path / "in.jsonl.gz"
    corrupt.write_bytes(b"this is not gzip")
    with pytest.raises(UsageError, match="could not be read"):
        validate(config_for(corrupt))


def test_to_dict_is_json_ready(tmp_path: Path) -> None:
    report = check(tmp_path, [chat("a", custom_id="d"), b"{", chat("b", custom_id="d")])
    data = orjson.loads(orjson.dumps(report.to_dict()))
    assert data["malformed_examples"] == [[2, report.malformed_examples[0][1]]]
    assert data["duplicate_examples"] == [[3, "d", 1]]
    assert data["would_fail"] is True
    assert data["estimated_cost"] is None


def test_render_lists_examples_with_line_numbers(tmp_path: Path) -> None:
    report = check(tmp_path, [chat("a"), b"[]", chat("b")], model="m")
    text = report.render()
    assert text.splitlines()[0].startswith(f"validate {tmp_path / 'in.jsonl'}: 3 rows, 2 valid")
    assert "line 2: expected a JSON object, got array" in text
    assert "models m 2" in text
    assert text.endswith("verdict: some rows would fail")
