#!/usr/bin/env python3
"""A WebSocket echo backend that registers itself with wslb (docs/PROTOCOL.md).

Needs only `websockets` >= 14 (the asyncio API whose connect() takes additional_headers=).
Usage: python_backend.py [BALANCER_URL [PORT]]; token from env WSLB_TOKEN, guid from WSLB_GUID.
Prints "listening on 127.0.0.1:PORT" once serving and "registered" after each registration.
"""
import asyncio, json, os, random, sys, uuid
import websockets


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def register(balancer, binding, guid):
    token = os.environ.get("WSLB_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    hello = {"type": "register", "version": 1, "guid": guid, "bindings": [binding]}
    delay = 0.1
    while True:  # reconnect forever: while this connection lives, we are in the pool
        try:
            async with websockets.connect(balancer, additional_headers=headers, ping_interval=5) as ws:
                await ws.send(json.dumps(hello))
                async for text in ws:
                    msg = json.loads(text)
                    if msg.get("type") == "registered":
                        print("registered", flush=True)
                        delay = 0.1
                    elif msg.get("type") in ("error", "unreachable"):
                        print(f"balancer: {text}", file=sys.stderr, flush=True)
        except (OSError, websockets.WebSocketException) as e:
            print(f"lost: {e}", file=sys.stderr, flush=True)
        await asyncio.sleep(random.uniform(0.1, delay))  # jitter: no reconnect storms
        delay = min(delay * 2, 10)


async def main():
    balancer = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:9090/register"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    async with websockets.serve(echo, "127.0.0.1", port) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"listening on 127.0.0.1:{port}", flush=True)
        guid = os.environ.get("WSLB_GUID") or f"py-{uuid.uuid4().hex[:12]}"
        await register(balancer, f"ws://127.0.0.1:{port}", guid)


if __name__ == "__main__":
    asyncio.run(main())
