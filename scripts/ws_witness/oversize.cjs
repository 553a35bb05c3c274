// Node `ws` witness for failing a connection so the peer learns why (docs/LIFECYCLE.md):
// a client sends a message over --max-frame-size through wslb, RUNS times. Every time the
// client must report 1009 (Node ws reports 1006 when the connection is reset before it read
// the close frame) and the backend must receive a close frame (1006 = none came).
//
// Usage: node scripts/ws_witness/oversize.cjs path/to/wslb   (ws@8 from target/node)
'use strict';

const path = require('path');
const { spawn } = require('child_process');

const ROOT = path.resolve(__dirname, '..', '..');
const { WebSocket, WebSocketServer } = require(path.join(ROOT, 'target', 'node', 'node_modules', 'ws'));

const RUNS = 20;
const MESSAGE = 50 * 1024 * 1024;
const LIMIT = '16MiB';
const STEP_MS = 10000;

function withDeadline(promise, what) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result after ${STEP_MS} ms`)), STEP_MS);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

function startBackend() {
  return new Promise((resolve) => {
    const closes = [];
    const server = new WebSocketServer({ host: '127.0.0.1', port: 0 }, () => {
      resolve({ server, closes, port: server.address().port });
    });
    server.on('connection', (ws) => {
      ws.on('message', (data) => ws.send(data));
      ws.on('close', (code) => closes.push(code));
      ws.on('error', () => {});
    });
  });
}

function startWslb(bin, backendPort) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ['-l', '127.0.0.1:0', '-B', `ws://127.0.0.1:${backendPort}`,
      '--max-frame-size', LIMIT], { stdio: ['ignore', 'ignore', 'pipe'] });
    let log = '';
    const timer = setTimeout(() => reject(new Error(`wslb did not start: ${log}`)), STEP_MS);
    child.stderr.on('data', (d) => {
      log += d;
      const m = /listening on (127\.0\.0\.1:\d+)/.exec(log);
      if (m) {
        clearTimeout(timer);
        resolve({ child, addr: m[1] });
      }
    });
    child.on('exit', (code) => reject(new Error(`wslb exited with ${code}: ${log}`)));
  });
}

function oneRun(addr, payload) {
  return new Promise((resolve) => {
    const ws = new WebSocket(`ws://${addr}/`);
    ws.on('open', () => ws.send(payload));
    ws.on('error', () => {});
    ws.on('close', (code) => resolve(code));
  });
}

async function main() {
  const bin = process.argv[2];
  if (!bin) {
    console.error('usage: node oversize.cjs path/to/wslb');
    process.exit(2);
  }
  const backend = await startBackend();
  const lb = await startWslb(bin, backend.port);
  const payload = Buffer.alloc(MESSAGE, 0x5a);
  const clientCodes = [];
  try {
    for (let i = 0; i < RUNS; i++) {
      const before = backend.closes.length;
      clientCodes.push(await withDeadline(oneRun(lb.addr, payload), `run ${i} client`));
      await withDeadline(new Promise((resolve) => {
        const poll = () => (backend.closes.length > before ? resolve() : setTimeout(poll, 5));
        poll();
      }), `run ${i} backend`);
    }
  } finally {
    lb.child.kill('SIGTERM');
    backend.server.close();
  }
  const count = (codes, code) => codes.filter((c) => c === code).length;
  console.log(`client close codes: ${JSON.stringify(clientCodes)}`);
  console.log(`backend close codes: ${JSON.stringify(backend.closes)}`);
  const ok = count(clientCodes, 1009) === RUNS && backend.closes.length === RUNS
    && count(backend.closes, 1006) === 0;
  console.log(`${ok ? 'PASS' : 'FAIL'}: client saw 1009 in ${count(clientCodes, 1009)}/${RUNS}, `
    + `backend got a close frame in ${backend.closes.length - count(backend.closes, 1006)}/${RUNS}`);
  process.exit(ok ? 0 : 1);
}

main().catch((e) => {
  console.error(e);
  process.exit(2);
});
