"""``batchrun validate``: a dry run over the input that sends nothing.

It parses every line exactly as a run would (same ``parse_line``, same job
defaults, same shard), and reports what a run would meet: malformed lines,
repeated custom ids, the mix of endpoints and models, estimated tokens and
cost, and rows too long for the model's context window.

The scan streams the input once and keeps per row only what it must: the
first line of each explicit custom id (to name the original of a duplicate)
and a few counters. Examples are capped at ``EXAMPLES`` per kind.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from batchrun.config import WHOLE, Costs, RunConfig, Shard
from batchrun.errors import UsageError
from batchrun.inputs import check_input_file, open_input
from batchrun.records import LineError, Request, parse_line
from batchrun.tokens import estimate_input_tokens, estimate_output_tokens

__all__ = ["EXAMPLES", "ValidationReport", "validate"]

# Examples kept per problem kind: enough to find a pattern, bounded on bad files.
EXAMPLES = 50

NO_MODEL = "(none)"


@dataclass(frozen=True, kw_only=True, slots=True)
class ValidationReport:
    """What a run over ``input`` would meet. Lines are 1-based input lines.

    Counts cover only the rows the shard owns (all rows without ``--shard``);
    ``rows == valid + malformed``. Token figures are estimates
    (``batchrun.tokens``): ``input_tokens`` sums the prompts of valid rows,
    ``max_output_tokens`` sums the most output each valid row allows, so
    ``estimated_cost`` (in the currency of the job's prices) is an upper bound
    on the output side and a rough figure on the input side. It is None unless
    both prices are set; for a ``--mode batch`` job (``batch_price``) it is the
    batch price (``batch_price_share`` of the prices). ``over_context``
    counts valid rows whose input plus most output exceeds the context limit
    (0 when no limit is set).
    Duplicates count only explicit ids (``custom_id`` or ``id``): each repeat
    after the first counts once. Example lists hold the first ``EXAMPLES``.
    """

    input: str
    rows: int
    valid: int
    malformed: int
    malformed_examples: list[tuple[int, str]]  # (line, reason)
    duplicate_ids: int
    duplicate_examples: list[tuple[int, str, int]]  # (line, custom_id, first line)
    endpoints: dict[str, int]  # request kind -> rows, most first
    models: dict[str, int]  # model -> rows, most first; NO_MODEL when the body has none
    input_tokens: int
    max_output_tokens: int
    estimated_cost: float | None
    over_context: int
    over_context_examples: list[tuple[int, int]]  # (line, estimated tokens)
    batch_price: bool = False

    @property
    def would_fail(self) -> bool:
        """Whether some row would certainly fail: malformed, or over the context limit."""
        return self.malformed > 0 or self.over_context > 0

    def to_dict(self) -> dict[str, object]:
        """All fields and ``would_fail``, as a fresh JSON-ready dict (tuples become lists)."""
        result: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = [list(example) for example in value]
            elif isinstance(value, dict):
                value = dict(value)
            result[f.name] = value
        result["would_fail"] = self.would_fail
        return result

    def render(self) -> str:
        """A short report for a person, without a trailing newline."""
        lines = [
            f"validate {self.input}: {self.rows:,} rows, {self.valid:,} valid,"
            f" {self.malformed:,} malformed, {self.duplicate_ids:,} duplicate ids,"
            f" {self.over_context:,} over context",
            "  endpoints " + _counts(self.endpoints),
            "  models " + _counts(self.models),
            "  " + self._tokens_line(),
        ]
        lines += _examples(
            "malformed", self.malformed, (f"line {n}: {why}" for n, why in self.malformed_examples)
        )
        duplicates = (
            f"line {n}: {cid!r} first on line {first}" for n, cid, first in self.duplicate_examples
        )
        lines += _examples("duplicate ids", self.duplicate_ids, duplicates)
        over = (f"line {n}: ~{tokens:,} tokens" for n, tokens in self.over_context_examples)
        lines += _examples("over context limit", self.over_context, over)
        lines.append("  verdict: " + ("some rows would fail" if self.would_fail else "ok"))
        return "\n".join(lines)

    def _tokens_line(self) -> str:
        text = f"tokens ~{self.input_tokens:,} in, at most {self.max_output_tokens:,} out"
        if self.estimated_cost is None:
            return text + "; cost unknown (set price_input_per_million, price_output_per_million)"
        price = " (batch price)" if self.batch_price else ""
        return text + f"; estimated cost at most {_money(self.estimated_cost)}{price}"


def validate(config: RunConfig) -> ValidationReport:
    """Scan ``config.input`` as a run would, sending nothing.

    Honours the job's model and params defaults, ``config.shard`` and
    ``config.costs``. Raises ``UsageError`` when the input is missing or
    cannot be read (a corrupt ``.gz``, say); bad lines are reported, not raised.
    """
    check_input_file(config.input)
    defaults = config.request_defaults()
    tally = _Tally(config.costs.context_limit)
    try:
        with open_input(config.input) as handle:
            for index, raw in _owned_lines(handle, config.shard or WHOLE):
                tally.add(parse_line(raw.rstrip(b"\r\n"), index + 1, defaults))
    except (OSError, EOFError) as exc:  # gzip's BadGzipFile is an OSError
        raise UsageError(f"input file {config.input} could not be read: {exc}") from None
    return tally.report(str(config.input), config.costs, batch=config.mode == "batch")


def _owned_lines(handle: Iterable[bytes], shard: Shard) -> Iterator[tuple[int, bytes]]:
    """(0-based row, raw line) for the rows ``shard`` owns.

    islice steps over the other shards' lines in C, so a shard pays for
    reading them but not for a Python-level test per line.
    """
    rows = itertools.count(shard.index, shard.count)
    # count() never ends: the lines decide where the pairs stop.
    return zip(rows, itertools.islice(handle, shard.index, None, shard.count), strict=False)


class _Tally:
    """The scan's running totals: mutable, one per ``validate`` call."""

    __slots__ = (
        "context_limit",
        "duplicate_examples",
        "duplicates",
        "endpoints",
        "input_tokens",
        "malformed",
        "malformed_examples",
        "max_output_tokens",
        "models",
        "over_context",
        "over_context_examples",
        "own_ids",
        "rows",
        "seen",
    )

    def __init__(self, context_limit: int | None) -> None:
        self.context_limit = context_limit
        self.rows = 0
        self.malformed = 0
        self.malformed_examples: list[tuple[int, str]] = []
        self.seen: dict[str, int] = {}  # explicit custom id -> first line
        # Bit N: line N's id is "line-N" (its own, given or not). One bit a
        # line, where the ids themselves would take a dict entry each.
        self.own_ids = bytearray()
        self.duplicates = 0
        self.duplicate_examples: list[tuple[int, str, int]] = []
        # Plain dicts rather than Counters: dict.get is the cheaper increment.
        self.endpoints: dict[str, int] = {}
        self.models: dict[str, int] = {}
        self.input_tokens = 0
        self.max_output_tokens = 0
        self.over_context = 0
        self.over_context_examples: list[tuple[int, int]] = []

    def add(self, parsed: Request | LineError) -> None:
        """Count one owned line's parse result."""
        self.rows += 1
        if isinstance(parsed, Request):
            self._request(parsed)
        else:
            self._malformed(parsed)
        self._check_id(parsed.line, parsed.custom_id)

    def _request(self, request: Request) -> None:
        body = request.body
        self.endpoints[request.kind] = self.endpoints.get(request.kind, 0) + 1
        model = body.get("model")
        if model.__class__ is not str or not model:  # the usual non-empty str skips a call
            model = _model_name(model)
        self.models[model] = self.models.get(model, 0) + 1
        tokens_in = estimate_input_tokens(body)
        tokens_out = estimate_output_tokens(body)
        self.input_tokens += tokens_in
        self.max_output_tokens += tokens_out
        limit = self.context_limit
        if limit is not None and tokens_in + tokens_out > limit:
            self.over_context += 1
            if len(self.over_context_examples) < EXAMPLES:
                self.over_context_examples.append((request.line, tokens_in + tokens_out))

    def _malformed(self, error: LineError) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < EXAMPLES:
            # parse_line prefixes "line N: "; the example already carries N.
            reason = error.message.removeprefix(f"line {error.line}: ")
            self.malformed_examples.append((error.line, reason))

    def _check_id(self, line: int, custom_id: str) -> None:
        # A line without an id gets "line-N"; another line may still give
        # that id explicitly. The startswith test keeps the rest off the path
        # of ordinary ids.
        if custom_id.startswith("line-"):
            if custom_id == f"line-{line}":
                self._own_id(line, custom_id)
                return
            named = _line_named(custom_id)
            if named is not None and named < line and self._holds_own_id(named):
                self._duplicate(line, custom_id, named)
                return
        first = self.seen.setdefault(custom_id, line)
        if first != line:
            self._duplicate(line, custom_id, first)

    def _own_id(self, line: int, custom_id: str) -> None:
        """Line ``line`` holds "line-N", its own: a duplicate if an earlier line gave it."""
        first = self.seen.get(custom_id)
        if first is not None:
            self._duplicate(line, custom_id, first)
        byte = line >> 3
        if byte >= len(self.own_ids):
            self.own_ids.extend(bytes(byte + 1 - len(self.own_ids)))
        self.own_ids[byte] |= 1 << (line & 7)

    def _holds_own_id(self, line: int) -> bool:
        byte = line >> 3
        return byte < len(self.own_ids) and bool(self.own_ids[byte] >> (line & 7) & 1)

    def _duplicate(self, line: int, custom_id: str, first: int) -> None:
        self.duplicates += 1
        if len(self.duplicate_examples) < EXAMPLES:
            self.duplicate_examples.append((line, custom_id, first))

    def report(self, input_name: str, costs: Costs, *, batch: bool) -> ValidationReport:
        """Freeze the totals; ``costs`` prices the token estimates (``batch``:
        at the batch price)."""
        price = costs.batch_price if batch else costs.price
        cost = price(self.input_tokens, self.max_output_tokens) if costs.priced else None
        return ValidationReport(
            input=input_name,
            rows=self.rows,
            valid=self.rows - self.malformed,
            malformed=self.malformed,
            malformed_examples=self.malformed_examples,
            duplicate_ids=self.duplicates,
            duplicate_examples=self.duplicate_examples,
            endpoints=_most_first(self.endpoints),
            models=_most_first(self.models),
            input_tokens=self.input_tokens,
            max_output_tokens=self.max_output_tokens,
            estimated_cost=cost,
            over_context=self.over_context,
            over_context_examples=self.over_context_examples,
            batch_price=batch,
        )


def _model_name(model: Any) -> str:
    """The key a body's ``model`` value (not a non-empty str) is counted under."""
    return NO_MODEL if model is None or model == "" else str(model)


def _most_first(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _counts(counts: dict[str, int]) -> str:
    return " | ".join(f"{name} {n:,}" for name, n in counts.items()) or "-"


def _examples(title: str, total: int, examples: Iterable[str]) -> list[str]:
    """A heading and one indented line per example; nothing when ``total`` is 0."""
    if total == 0:
        return []
    shown = list(examples)
    more = f" (first {len(shown)})" if len(shown) < total else ""
    return [f"  {title}{more}:"] + [f"    {text}" for text in shown]


def _money(amount: float) -> str:
    """Two decimals for sums worth reading that way, four significant digits below 1."""
    return f"{amount:,.2f}" if amount >= 1 else f"{amount:.4g}"


def _line_named(custom_id: str) -> int | None:
    """N for an id "line-N" (N a plain positive number), else None."""
    digits = custom_id[5:]
    if digits.isascii() and digits.isdigit() and not digits.startswith("0"):
        return int(digits)
    return None
