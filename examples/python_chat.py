#!/usr/bin/env python3
"""A chat backend: every line a client sends reaches every client of every balancer.

Run it under `wslb agent`, which registers it with each balancer and serves the local
messaging endpoint it posts to (docs/PROTOCOL.md, "Messaging"):

    wslb agent -b ws://lb1:9090/register -b ws://lb2:9090/register \\
        --binding ws://127.0.0.1:8001 --local 127.0.0.1:0 -- python3 python_chat.py 8001

The agent passes WSLB_AGENT_URL and WSLB_AGENT_TOKEN in the environment. Each client is
named by the id the balancer put in `X-Wslb-Client` (INSTANCE.N, unique across
balancers); the backend never holds the other clients' sockets: the balancers do.
Needs only `websockets` >= 14 (and the standard library).
"""
import asyncio, json, os, sys, urllib.request

AGENT = os.environ.get("WSLB_AGENT_URL", "http://127.0.0.1:7070")
TOKEN = os.environ.get("WSLB_AGENT_TOKEN", "")


def post(path, body):
    """One request to the agent; returns (status, JSON answer). Blocking: run in a thread."""
    req = urllib.request.Request(AGENT + path, data=body.encode(), method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "text/plain; charset=utf-8"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


async def chat(ws):
    me = ws.request.headers.get("X-Wslb-Client", "?")
    await ws.send(f"welcome {me}")
    async for line in ws:
        if isinstance(line, str):
            # To everyone else, on every balancer, through every balancer's control channel.
            status, answer = await asyncio.to_thread(post, f"/broadcast?except={me}", f"{me}: {line}")
            await ws.send(f"sent to {answer.get('sent', 0)}" if status == 200 else f"error {answer}")


async def main():
    import websockets
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    async with websockets.serve(chat, "127.0.0.1", port) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
