"""What every peer script shares: its flags, the input rows and the request body.

Every peer is run as ``python benchmarks/peers/NAME.py --input IN --out OUT
--base-url URL --concurrency C``, sends each input row once, writes one line
per answer and exits 0 only if every answer was a success.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import orjson

MODEL = "mock"  # every client names the same model, so every request body has one shape


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", required=True, help="JSONL of chat rows")
    parser.add_argument("--out", required=True, help="one line per answer, in any order")
    parser.add_argument("--base-url", required=True, help="the provider's base URL")
    parser.add_argument("--concurrency", type=int, required=True, help="requests in flight")
    return parser.parse_args()


def read_rows(path: str) -> Iterator[dict[str, Any]]:
    """The input rows one by one (streamed)."""
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                yield orjson.loads(line)


def chat_body(row: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI chat body of a row: the model and the row's messages."""
    return {"model": MODEL, "messages": row["messages"]}


def answer_line(custom_id: str, content: str) -> bytes:
    return orjson.dumps({"custom_id": custom_id, "content": content}) + b"\n"
