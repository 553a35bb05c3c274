"""Conforming third-party echo server for Autobahn's fuzzingclient: Python `websockets`.

Binds 127.0.0.1:0 (or the port given), prints "PORT <n>" once listening, echoes every message.
websockets fails a connection with a close frame (1002, 1007, ...) before closing TCP.
"""

import asyncio
import sys

from websockets.asyncio.server import serve


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    # Autobahn's 9.* cases send messages up to 16 MiB; no size limit of our own.
    async with serve(echo, "127.0.0.1", port, max_size=None, max_queue=None) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"PORT {bound}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
