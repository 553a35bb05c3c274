"""Backends for tests/keepalive_pool.rs: third-party HTTP servers (gunicorn, uvicorn) that
close idle keep-alive connections. Each answers `<method> <body length>` with
Content-Length and no `Connection: close`, after reading the whole request body."""


def wsgi(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    out = f"{environ['REQUEST_METHOD']} {len(body)}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    size = 0
    more = True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    out = f"{scope['method']} {size}".encode()
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(out)).encode())],
    })
    await send({"type": "http.response.body", "body": out})
