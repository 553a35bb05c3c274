"""Drives headless Chromium over the DevTools protocol for tests/status_page.rs.

usage: status_page_cdp.py DEVTOOLS_PORT PAGE_URL BACKEND_TO_DRAIN OUT_DIR

Opens the live status page, waits for snapshots, reads how many points each chart drew,
takes two screenshots a few seconds apart, clicks the Drain button of one backend with a
real mouse event, waits for the page to show it draining, and prints one JSON object.
"""
import base64
import json
import sys
import time
import urllib.parse
import urllib.request

from websockets.sync.client import connect

port, page_url, victim, out_dir = sys.argv[1:5]
base = f"http://127.0.0.1:{port}"
req = urllib.request.Request(f"{base}/json/new?{urllib.parse.quote(page_url, safe='')}", method="PUT")
target = json.load(urllib.request.urlopen(req, timeout=10))

ws = connect(target["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=10)
next_id = 0


def call(method, **params):
    global next_id
    next_id += 1
    ws.send(json.dumps({"id": next_id, "method": method, "params": params}))
    while True:
        msg = json.loads(ws.recv(timeout=20))
        if msg.get("id") == next_id:
            if "error" in msg:
                raise RuntimeError(f"{method}: {msg['error']}")
            return msg["result"]


def evaluate(expr):
    r = call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
    return r["result"].get("value")


def wait_for(expr, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if evaluate(expr):
            return True
        time.sleep(0.2)
    return False


CHARTS = """JSON.stringify([...document.querySelectorAll('#charts .card')].map(c => ({
  name: c.dataset.name || 'all',
  points: [...c.querySelectorAll('svg')].reduce((n, s) => n + +s.getAttribute('data-points'), 0),
  paths: [...c.querySelectorAll('polyline')].map(p => p.getAttribute('points')).join('|')})))"""


def shot(n):
    png = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
    path = f"{out_dir}/status-page-{n}.png"
    with open(path, "wb") as f:
        f.write(png)
    return path


call("Page.enable")
call("Emulation.setDeviceMetricsOverride", width=1280, height=1000, deviceScaleFactor=1, mobile=False)
call("Page.reload")
result = {"live": wait_for("+(document.body && document.body.dataset.snapshots || 0) >= 3")}
result["first"] = json.loads(evaluate(CHARTS))
result["screenshots"] = [shot(1)]
time.sleep(3)
result["second"] = json.loads(evaluate(CHARTS))
result["screenshots"].append(shot(2))

sel = json.dumps(f'#backends tr[data-name="{victim}"] button')
rect = evaluate(f"(() => {{ const b = document.querySelector({sel}); if (!b) return null;"
                " const r = b.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2, b.textContent]; })()")
result["button"] = rect
if rect:
    x, y = rect[0], rect[1]
    for kind in ("mousePressed", "mouseReleased"):
        call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
    row = json.dumps(f'#backends tr[data-name="{victim}"]')
    result["drained"] = wait_for(f"(document.querySelector({row}) || {{}}).className === 'draining'")
    result["events"] = evaluate("document.getElementById('events').textContent")
    result["screenshots"].append(shot(3))
print(json.dumps(result))
ws.close()
