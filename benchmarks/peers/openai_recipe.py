"""The official openai SDK's asyncio recipe.

``AsyncOpenAI(base_url=..., api_key="bench", max_retries=0)`` with its default
HTTP client (httpx), a semaphore of C, and ``asyncio.gather`` over one
``client.chat.completions.create(...)`` per row. As in the recipe, all rows
(and so all coroutines) are created up front and answers are written once
``gather`` returns, so memory grows with the input. Exits 1 if any call failed.
"""

from __future__ import annotations

import asyncio
import sys

from _common import MODEL, answer_line, parse_args, read_rows
from openai import AsyncOpenAI


async def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    rows = list(read_rows(args.input))
    limit = asyncio.Semaphore(args.concurrency)
    async with AsyncOpenAI(base_url=args.base_url, api_key="bench", max_retries=0) as client:

        async def one(row: dict) -> tuple[str, str]:
            async with limit:
                answer = await client.chat.completions.create(model=MODEL, messages=row["messages"])
            return row["custom_id"], answer.choices[0].message.content or ""

        results = await asyncio.gather(*(one(row) for row in rows))
    with open(args.out, "wb") as out:  # noqa: ASYNC230 - plain writes, as in the recipes
        for custom_id, content in results:
            out.write(answer_line(custom_id, content))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
