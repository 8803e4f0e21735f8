"""The DashScope SDK's asyncio recipe, against the DashScope native dialect.

``dashscope.AioGeneration.call(...)`` for each row, all calls sharing one
custom ``aiohttp.ClientSession`` (the SDK takes it as ``session=``, see its
example ``aio_generation/custom_session.py``) over a ``TCPConnector(limit=C)``,
a semaphore of C and ``asyncio.gather`` over all rows. ``--base-url`` is the
mock's ``/api/v1`` root, set as ``dashscope.base_http_api_url``. Answers are
written once ``gather`` returns, as in the recipe. The SDK's own retry wrapper
stays at its defaults (the mock never fails here). Exits 1 if any call failed.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import dashscope
from _common import MODEL, answer_line, parse_args, read_rows
from dashscope import AioGeneration


async def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    dashscope.base_http_api_url = args.base_url.rstrip("/")
    rows = list(read_rows(args.input))
    limit = asyncio.Semaphore(args.concurrency)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(row: dict) -> tuple[str, int, str]:
            async with limit:
                answer = await AioGeneration.call(
                    model=MODEL,
                    messages=row["messages"],
                    api_key="bench",
                    result_format="message",
                    session=session,
                )
            if answer.status_code != 200:
                return row["custom_id"], answer.status_code, answer.message or ""
            return row["custom_id"], 200, answer.output.choices[0].message.content

        results = await asyncio.gather(*(one(row) for row in rows))
    failed = 0
    with open(args.out, "wb") as out:  # noqa: ASYNC230 - plain writes, as in the recipes
        for custom_id, status, content in results:
            failed += status != 200
            if status == 200:
                out.write(answer_line(custom_id, content))
    if failed:
        print(f"dashscope_recipe: {failed} calls failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
