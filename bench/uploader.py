"""Uploads in a process of their own (the uploads workload of bench/loadgen.py).

The process that measures chat latency must do only the chat: twenty 1 MiB
uploads at a time from its own event loop kept that loop busy, and every
message due meanwhile counted the load generator's lag as the server's.

    python -m bench.uploader '{"url": ..., "cookies": [...], "image": path, "seconds": s}'

prints {"status code": count, ...} of the uploads it made.
"""

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import httpx


async def upload(url: str, cookies: list[str], image: bytes, seconds: float) -> Counter[int]:
    statuses: Counter[int] = Counter()
    end = time.perf_counter() + seconds

    async def keep_uploading(http: httpx.AsyncClient, cookie: str) -> None:
        while time.perf_counter() < end:
            response = await http.post("/api/attachments", params={"name": "photo.png"}, content=image,
                                       headers={"Cookie": cookie, "Content-Type": "image/png"})
            statuses[response.status_code] += 1

    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=120,
                                 limits=httpx.Limits(max_connections=len(cookies))) as http:
        await asyncio.gather(*(keep_uploading(http, cookie) for cookie in cookies))
    return statuses


def main() -> None:
    plan = json.loads(sys.argv[1])
    statuses = asyncio.run(upload(plan["url"], plan["cookies"], Path(plan["image"]).read_bytes(), plan["seconds"]))
    print(json.dumps(statuses))


if __name__ == "__main__":
    main()
