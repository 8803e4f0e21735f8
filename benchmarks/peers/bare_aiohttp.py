"""The floor: the least a correct async client must do for each row.

One ``aiohttp.ClientSession`` over one ``TCPConnector(limit=C)``; C worker
tasks pull rows from the shared input iterator (so memory stays flat), POST
each body to ``{base_url}/chat/completions``, parse the JSON answer and write a
line as soon as it arrives. No retries, no ordering, no journal, no progress.
Any failed request ends the run with a non-zero exit.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import orjson
from _common import answer_line, chat_body, parse_args, read_rows


async def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    url = args.base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
    rows = read_rows(args.input)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    with open(args.out, "wb") as out:  # noqa: ASYNC230 - plain writes, as in the recipes
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

            async def worker() -> None:
                for row in rows:  # one shared iterator: each worker takes the next row
                    async with session.post(url, data=orjson.dumps(chat_body(row))) as resp:
                        resp.raise_for_status()
                        answer = orjson.loads(await resp.read())
                    content = answer["choices"][0]["message"]["content"]
                    out.write(answer_line(row["custom_id"], content))

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
