"""Many real WebSocket clients for tests/spread_drain.rs (Python `websockets`, asyncio).

Usage: spread_clients.py URL N [--reconnect]

Opens N WebSockets to URL, asks each `whoami` (the echo backend answers its name), then
prints `ready {"backend": count, ...}`. Each close is recorded with its code, the wall-clock
time it arrived and the backend the client was on. With --reconnect a client closed with
1012 connects again at once (the balancer's job is to spread the closes, not the
client's) and asks `whoami` again. Without it, once every client is closed, or on a
`report` line on stdin in either mode, it prints `report {json}` and exits:
{"clients": [{"first": name, "now": name or null, "closes": [[code, time, backend]],
"errors": [...]}]}.
"""

import asyncio
import json
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

CONNECT_AT_ONCE = 64
RECONNECT_TRIES = 50


class Client:
    def __init__(self):
        self.first = None
        self.now = None
        self.closes = []
        self.errors = []
        # Between a 1012 and the answer to the new connection's whoami.
        self.reconnecting = False


async def open_one(url):
    ws = await connect(url, ping_interval=None, close_timeout=2, open_timeout=10)
    await ws.send("whoami")
    return ws, await ws.recv()


async def run_client(url, client, gate, reconnect, opened):
    async with gate:
        try:
            ws, name = await open_one(url)
        except Exception as e:  # noqa: BLE001 - recorded for the test to show
            client.errors.append(f"connect: {e!r}")
            opened.release()
            return
    client.first = client.now = name
    opened.release()
    while True:
        try:
            await ws.recv()
            continue
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd is not None else None
            client.closes.append([code, time.time(), client.now])
        client.now = None
        if not (reconnect and code == 1012):
            return
        client.reconnecting = True
        for _ in range(RECONNECT_TRIES):
            try:
                ws, name = await open_one(url)
                client.now = name
                client.reconnecting = False
                break
            except Exception as e:  # noqa: BLE001
                client.errors.append(f"reconnect: {e!r}")
                await asyncio.sleep(0.1)
        else:
            client.reconnecting = False
            return


def report(clients):
    body = {
        "clients": [
            {"first": c.first, "now": c.now, "closes": c.closes, "errors": c.errors}
            for c in clients
        ]
    }
    print("report " + json.dumps(body), flush=True)


async def main():
    url, n = sys.argv[1], int(sys.argv[2])
    reconnect = "--reconnect" in sys.argv[3:]
    clients = [Client() for _ in range(n)]
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    opened = asyncio.Semaphore(0)
    tasks = [
        asyncio.create_task(run_client(url, c, gate, reconnect, opened)) for c in clients
    ]
    for _ in range(n):
        await opened.acquire()
    counts = {}
    for c in clients:
        counts[c.first] = counts.get(c.first, 0) + 1
    print("ready " + json.dumps(counts), flush=True)

    loop = asyncio.get_running_loop()
    stdin_line = loop.run_in_executor(None, sys.stdin.readline)
    all_done = asyncio.gather(*tasks)
    await asyncio.wait([stdin_line, all_done], return_when=asyncio.FIRST_COMPLETED)
    # A reconnect the balancer already counts may not have had its whoami answered yet
    # (on a loaded machine): let those finish, for at most 5 s, so the report is settled.
    settle = time.monotonic() + 5
    while any(c.reconnecting for c in clients) and time.monotonic() < settle:
        await asyncio.sleep(0.02)
    report(clients)
    sys.stdout.flush()
    # Open sockets and the stdin reader thread are left to process exit.
    import os

    os._exit(0)


asyncio.run(main())
