"""Held WebSockets for tests/upgrade.rs, with Python `websockets` as the client.

Opens COUNT connections to URL, prints "ready COUNT" once all are open, then every
INTERVAL seconds sends each a numbered text message and expects it echoed back, until the
server closes it (or MAX_SECONDS pass). Prints one JSON summary line at the end:
opened, open failures, close codes seen, echo mismatches or timeouts, and the fewest echoes
any client got before its close."""

import asyncio
import json
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def hold(url, index, interval, deadline, stats, opened):
    try:
        ws = await connect(url, open_timeout=10, ping_interval=None, max_queue=4)
    except Exception as e:  # noqa: BLE001 - any failure to open is the figure we report
        stats["open_failures"] += 1
        stats["open_errors"].append(repr(e)[:120])
        opened.release()
        return
    opened.release()
    echoes = 0
    seq = 0
    try:
        await stats["go"].wait()
        while time.monotonic() < deadline:
            seq += 1
            msg = f"{index}:{seq}"
            await ws.send(msg)
            try:
                got = await asyncio.wait_for(ws.recv(), timeout=5)
            except asyncio.TimeoutError:
                stats["echo_timeouts"] += 1
                break
            if got != msg:
                stats["mismatches"] += 1
            else:
                echoes += 1
            await asyncio.sleep(interval)
    except ConnectionClosed:
        pass
    finally:
        if ws.close_code is None:
            await ws.close()
            code = "still-open"
        else:
            code = str(ws.close_code)
        stats["closes"][code] = stats["closes"].get(code, 0) + 1
        stats["min_echoes"] = min(stats["min_echoes"], echoes)


async def main():
    url, count, interval, max_seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    stats = {"open_failures": 0, "open_errors": [], "closes": {}, "mismatches": 0,
             "echo_timeouts": 0, "min_echoes": 1 << 30, "go": asyncio.Event()}
    opened = asyncio.Semaphore(0)
    deadline = time.monotonic() + max_seconds
    tasks = []
    for i in range(count):
        tasks.append(asyncio.create_task(hold(url, i, interval, deadline, stats, opened)))
        if i % 50 == 49:
            await asyncio.sleep(0.01)
    for _ in range(count):
        await opened.acquire()
    print(f"ready {count - stats['open_failures']}", flush=True)
    stats["go"].set()
    await asyncio.gather(*tasks)
    del stats["go"]
    stats["opened"] = count - stats["open_failures"]
    print(json.dumps(stats), flush=True)


asyncio.run(main())
