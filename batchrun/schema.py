"""``--response-schema``: ask for JSON answers and check each one against a
JSON Schema (the ``jsonschema`` library).

Three parts, one per step of a row: ``load_response_schema`` reads and checks
the schema (a bad one is a usage error, before any request);
``response_format`` is what a request adds to ask for JSON in its dialect;
``AnswerCheck.classify`` is the one place a successful HTTP answer becomes a
parsed object or a classified error.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from batchrun.answers import read_answer
from batchrun.errors import RowError, TransientError, UsageError
from batchrun.records import Response

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

# jsonschema is imported only where a schema is used: it costs a run that
# has none tens of milliseconds at start-up.

# The codes of answers that failed the check. The first two are paid answers
# that another attempt may cure; a truncated one would be cut the same way.
INVALID_JSON, SCHEMA_MISMATCH, TRUNCATED = "invalid_json", "schema_mismatch", "truncated"
_SHOWN = 200  # characters of a bad answer quoted in its error message
# orjson reads an integer past 64 bits as a float, silently rounded; only a
# text with a run of this many digits can hold one (-(2**63 + 1) has 19).
_LONG_NUMBER = re.compile(r"[0-9]{19}")


@dataclass(frozen=True, slots=True)
class ResponseSchema:
    """A checked JSON Schema, its file, and a digest for the run's fingerprint."""

    path: Path
    schema: dict[str, Any]
    digest: str


def load_response_schema(path: Path) -> ResponseSchema:
    """Read ``path`` as a JSON Schema; ``UsageError`` naming what is wrong when
    it is missing, not JSON, not an object, or not a valid schema for its
    draft (``$schema``, default the latest)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--response-schema {path}: cannot read it ({exc.strerror})") from None
    try:
        schema = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"--response-schema {path} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise UsageError(f"--response-schema {path} must hold a JSON object (a JSON Schema)")
    import jsonschema.validators
    from jsonschema.exceptions import SchemaError

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(map(str, exc.path)) or "the top level"
        raise UsageError(
            f"--response-schema {path} is not a valid JSON Schema: {exc.message} (at {where})"
        ) from None
    digest = hashlib.sha256(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return ResponseSchema(path=path, schema=schema, digest=digest)


def response_format(dialect: str, schema: ResponseSchema) -> dict[str, Any]:
    """The ``response_format`` request parameter that asks for JSON answers:
    DashScope's native API knows only ``json_object``; OpenAI-compatible
    endpoints take the schema itself."""
    if dialect == "dashscope":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema.schema}}


class AnswerCheck:
    """Parses and validates the text of each successful answer.

    ``failures`` counts the answers that failed, by code, over the run: each
    was paid for, retried or not.
    """

    def __init__(self, schema: ResponseSchema) -> None:
        import jsonschema.validators
        from jsonschema.exceptions import best_match

        cls = jsonschema.validators.validator_for(schema.schema)
        self._validator: Validator = cls(schema.schema)
        self._best_match = best_match
        self.failures: collections.Counter[str] = collections.Counter()

    def classify(self, response: Response) -> Any:
        """The answer's parsed JSON, or raise: ``RowError`` ``truncated`` when
        it was cut at the token limit (finish_reason ``length``), else
        ``TransientError`` ``invalid_json`` or ``schema_mismatch``. An answer
        without text (embeddings) passes as None. A failure is counted (see
        ``failures``): the answer was paid for."""
        try:
            return self.judge(response)
        except (RowError, TransientError) as exc:
            self.failures[exc.code] += 1
            raise

    def judge(self, response: Response) -> Any:
        """``classify`` without counting a failure: for a stored answer about
        to be reused, which this run does not pay for."""
        answer = read_answer(response.body)
        if answer.text is None:
            return None
        if answer.finish_reason == "length":
            raise self._failed(
                RowError,
                TRUNCATED,
                "the answer was cut off at the token limit (finish_reason length); not"
                " retried, since a retry pays for the same cut: raise max_tokens",
                response,
            )
        try:
            parsed = orjson.loads(answer.text)
        except orjson.JSONDecodeError as exc:
            shown = answer.text[:_SHOWN]
            message = f"the answer is not JSON ({exc}): {shown!r}"
            raise self._failed(TransientError, INVALID_JSON, message, response) from None
        if _LONG_NUMBER.search(answer.text) and _has_huge_integer(answer.text):
            message = (
                "the answer holds an integer past 64 bits, which would be kept rounded:"
                f" {answer.text[:_SHOWN]!r} (have the schema ask for such numbers as strings)"
            )
            raise self._failed(TransientError, INVALID_JSON, message, response)
        error = self._best_match(self._validator.iter_errors(parsed))
        if error is not None:
            where = "/".join(map(str, error.absolute_path)) or "the top level"
            message = f"the answer does not match the response schema: {error.message} (at {where})"
            raise self._failed(TransientError, SCHEMA_MISMATCH, message, response)
        return parsed

    def _failed(
        self, kind: type[RowError | TransientError], code: str, message: str, response: Response
    ) -> RowError | TransientError:
        return kind(
            code,
            message,
            status=response.status_code,
            body=response.body,
            request_id=response.request_id,
        )

    def report(self) -> dict[str, int]:
        """Summary lines: the paid answers that failed the check, by kind."""
        return {
            "answers not JSON (paid)": self.failures[INVALID_JSON],
            "answers off the schema (paid)": self.failures[SCHEMA_MISMATCH],
            "answers cut off (paid)": self.failures[TRUNCATED],
        }


def _has_huge_integer(text: str) -> bool:
    """Whether the JSON ``text`` (valid) holds an integer outside the 64-bit
    range orjson reads exactly: the standard parser reads each one as written."""
    huge = False

    def integer(digits: str) -> int:
        nonlocal huge
        value = int(digits)
        huge = huge or not -(1 << 63) <= value < (1 << 64)
        return value

    try:
        json.loads(text, parse_int=integer)
    except RecursionError:  # nested past the standard parser: keep orjson's reading
        return False
    return huge
