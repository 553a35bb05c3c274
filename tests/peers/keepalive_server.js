// Backend for tests/keepalive_pool.rs: Node's own `http` server with a short
// keepAliveTimeout. Usage: node keepalive_server.js PORT KEEPALIVE_MS
// Answers `<method> <body length>` with Content-Length once the body is read.
const http = require("http");
const [port, keepAliveMs] = process.argv.slice(2).map(Number);
const server = http.createServer((req, res) => {
  let size = 0;
  req.on("data", (chunk) => { size += chunk.length; });
  req.on("end", () => {
    const out = `${req.method} ${size}`;
    res.writeHead(200, { "Content-Type": "text/plain", "Content-Length": Buffer.byteLength(out) });
    res.end(out);
  });
});
server.keepAliveTimeout = keepAliveMs;
server.listen(port, "127.0.0.1", () => console.log(`listening on ${port}`));
