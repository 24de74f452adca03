'use strict';
// A real upstream HTTP server for the proxy's tests (see tests/http_server.py).
//
//   node tests/http_server.js CONFIG
//
// CONFIG is a JSON object (or the path of a file holding one): {"cert": PEM path,
// "key": PEM path}. Listens on 127.0.0.1, port 0, on four listeners and prints one line
// to stdout, {"http": P1, "https": P2, "h1tls": P3, "raw": P4}, then nothing more:
//   http   plain HTTP/1.1, keep-alive
//   https  TLS, HTTP/2 and HTTP/1.1 by ALPN (http2.createSecureServer, allowHTTP1)
//   h1tls  TLS, HTTP/1.1 only (https.createServer)
//   raw    answers any request head with a close-delimited response, then closes
// Exits when stdin closes and on SIGTERM/SIGINT. Errors go to stderr.

const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const http2 = require('http2');
const https = require('https');
const net = require('net');
const zlib = require('zlib');

const arg = process.argv[2] || '{}';
const config = JSON.parse(arg.trim().startsWith('{') ? arg : fs.readFileSync(arg, 'utf8'));

function fail(err) {
  process.stderr.write(`http_server.js: ${err && err.stack || err}\n`);
}
process.on('uncaughtException', fail);
process.on('unhandledRejection', fail);
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
process.stdin.resume();

// ---- request counts (all listeners); /stats itself is not counted ----
let stats = {};
function count(path) {
  if (path === '/stats' || path === '/stats/reset') return;
  stats[path] = (stats[path] || 0) + 1;
}

// ---- documents ----
const JSON_DOC = Buffer.from(JSON.stringify({
  users: [
    {id: 1, name: 'ann', email: 'ann@example.com', card: '4111 1111 1111 1111'},
    {id: 2, name: 'bob', email: 'bob@example.com', card: '5500 0000 0000 0004'},
  ],
  token: 's3cr3t-token-value',
  note: 'call +1 (555) 123-4567',
}));
const COMPRESSED = {
  '/gzip': ['gzip', zlib.gzipSync(JSON_DOC)],
  '/deflate': ['deflate', zlib.deflateSync(JSON_DOC)],
  '/br': ['br', zlib.brotliCompressSync(JSON_DOC)],
};
const BLOCK = Buffer.alloc(64 * 1024, 'x');
const RAW_RESPONSE = Buffer.from(
  'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n' +
  'closed-delimited body with bob@example.com\n');

// ---- helpers ----
function parse(req) {
  const u = new URL(req.url, 'http://x');
  const query = {};
  for (const [k, v] of u.searchParams) {
    if (!(k in query)) query[k] = v;
    else if (Array.isArray(query[k])) query[k].push(v);
    else query[k] = [query[k], v];
  }
  return {path: u.pathname, query, params: u.searchParams};
}

function send(res, status, type, body, extra) {
  const buf = Buffer.isBuffer(body) ? body : Buffer.from(body);
  const headers = Object.assign({'content-length': buf.length}, extra || {});
  if (type) headers['content-type'] = type;
  res.writeHead(status, headers);
  res.end(buf);
}

function sendJSON(res, status, obj) {
  send(res, status, 'application/json', JSON.stringify(obj));
}

function readBody(req, cb) {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => cb(Buffer.concat(chunks)));
}

function intParam(params, name, dflt) {
  const v = params.get(name);
  if (v === null || v === '') return dflt;
  const n = Number.parseInt(v, 10);
  return Number.isFinite(n) && n >= 0 ? n : dflt;
}

// ---- the handler shared by http, https (h1 + h2) and h1tls ----
function handle(listener) {
  return function handler(req, res) {
    req.on('error', () => {});
    res.on('error', () => {});
    let p;
    try {
      p = parse(req);
    } catch (e) {
      return sendJSON(res, 400, {error: 'bad url'});
    }
    count(p.path);
    const {path, query, params} = p;
    const method = req.method;

    if (path === '/json' && (method === 'GET' || method === 'HEAD')) {
      return send(res, 200, 'application/json', JSON_DOC);
    }
    if (path === '/echo') {
      return readBody(req, (body) => {
        const headers = {};
        const pseudo = {};
        for (const [k, v] of Object.entries(req.headers)) {
          if (k.startsWith(':')) pseudo[k] = v; else headers[k.toLowerCase()] = v;
        }
        const raw = [];
        for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
          if (!req.rawHeaders[i].startsWith(':')) raw.push([req.rawHeaders[i], req.rawHeaders[i + 1]]);
        }
        sendJSON(res, 200, {
          method, url: req.url, path, query, headers,
          body: body.toString('utf8'),
          body_length: body.length,
          body_sha256: crypto.createHash('sha256').update(body).digest('hex'),
          http_version: req.httpVersion,
          raw_headers: raw,
          pseudo_headers: pseudo,
          listener,
        });
      });
    }
    if (path === '/chunked' && (method === 'GET' || method === 'HEAD')) {
      const interval = intParam(params, 'interval_ms', 0);
      res.writeHead(200, {'content-type': 'text/plain'});
      let i = 1;
      const next = () => {
        if (res.destroyed || res.stream && res.stream.destroyed) return;
        res.write(`part ${i} carol@example.com\n`);
        if (++i > 5) return res.end();
        if (interval > 0) setTimeout(next, interval); else next();
      };
      return next();
    }
    if (COMPRESSED[path] && (method === 'GET' || method === 'HEAD')) {
      const [enc, body] = COMPRESSED[path];
      return send(res, 200, 'application/json', body, {'content-encoding': enc});
    }
    if (path === '/sse' && method === 'GET') {
      const n = intParam(params, 'n', 5);
      const interval = intParam(params, 'interval_ms', 50);
      res.writeHead(200, {'content-type': 'text/event-stream', 'cache-control': 'no-cache'});
      if (res.flushHeaders) res.flushHeaders();
      let k = 0;
      let timer = null;
      const tick = () => {
        if (k >= n) return res.end();
        res.write(`data: {"i":${k},"email":"dave@example.com"}\n\n`);
        k++;
        timer = setTimeout(tick, k >= n ? 0 : interval);
      };
      res.on('close', () => clearTimeout(timer));
      return tick();
    }
    let m;
    if ((m = /^\/status\/(\d{3})$/.exec(path))) {
      const code = Number(m[1]);
      if (code < 200 || code > 599) return sendJSON(res, 400, {error: 'status must be 200..599'});
      if (code === 204 || code === 304) {
        res.writeHead(code);
        return res.end();
      }
      res.writeHead(code, {'content-length': 0});
      return res.end();
    }
    if (path === '/big' && (method === 'GET' || method === 'HEAD')) {
      const total = intParam(params, 'bytes', 1024 * 1024);
      const chunked = params.get('chunked') === '1';
      const headers = {'content-type': 'application/octet-stream'};
      if (!chunked) headers['content-length'] = total;
      res.writeHead(200, headers);
      if (method === 'HEAD') return res.end();
      let left = total;
      const pump = () => {
        while (left > 0) {
          const n = Math.min(left, BLOCK.length);
          left -= n;
          const more = res.write(n === BLOCK.length ? BLOCK : BLOCK.subarray(0, n));
          if (!more && left > 0) return res.once('drain', pump);
        }
        res.end();
      };
      res.on('close', () => { left = 0; });
      return pump();
    }
    if (path === '/upload' && method === 'POST') {
      const hash = crypto.createHash('sha256');
      let n = 0;
      req.on('data', (c) => { n += c.length; hash.update(c); });
      req.on('end', () => sendJSON(res, 200, {bytes: n, sha256: hash.digest('hex')}));
      return;
    }
    if (path === '/stats' && (method === 'GET' || method === 'HEAD')) {
      return sendJSON(res, 200, stats);
    }
    if (path === '/stats/reset' && method === 'POST') {
      return readBody(req, () => {
        stats = {};
        sendJSON(res, 200, stats);
      });
    }
    if (path === '/redirect') {
      return send(res, 302, 'text/plain', '', {location: '/json'});
    }
    // Drain any body so the connection stays usable, then 404.
    req.resume();
    return sendJSON(res, 404, {error: 'not found'});
  };
}

function checkContinue(handler) {
  return (req, res) => {
    let path = req.url;
    try { path = new URL(req.url, 'http://x').pathname; } catch (e) { /* handler answers 400 */ }
    if (path === '/no-continue') {
      count(path);
      req.on('error', () => {});
      res.on('error', () => {});
      res.writeHead(417, {'content-length': 0});
      return res.end();
    }
    res.writeContinue();
    return handler(req, res);
  };
}

function setup(server, name) {
  const handler = handle(name);
  server.on('request', handler);
  server.on('checkContinue', checkContinue(handler));
  server.keepAliveTimeout = 60000;
  server.headersTimeout = 65000;
  server.on('error', fail);
  return server;
}

function listen(server) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server.address().port));
  });
}

// ---- the raw listener ----
const rawServer = net.createServer((sock) => {
  sock.on('error', () => {});
  sock.setTimeout(30000, () => sock.destroy());
  let head = Buffer.alloc(0);
  let answered = false;
  sock.on('data', (chunk) => {
    if (answered) return;  // discard anything after the head (a body, say)
    head = Buffer.concat([head, chunk]);
    const end = head.indexOf('\r\n\r\n');
    if (end < 0) {
      if (head.length > 65536) sock.destroy();
      return;
    }
    answered = true;
    const line = head.subarray(0, head.indexOf('\r\n')).toString('latin1').split(' ');
    let path = line[1] || '/';
    try { path = new URL(path, 'http://x').pathname; } catch (e) { /* keep it */ }
    count(path);
    sock.end(RAW_RESPONSE);
  });
});

async function main() {
  const tls = {
    cert: config.cert ? fs.readFileSync(config.cert) : undefined,
    key: config.key ? fs.readFileSync(config.key) : undefined,
  };
  const plain = setup(http.createServer({keepAlive: true}), 'http');
  const h2 = setup(http2.createSecureServer(Object.assign({allowHTTP1: true}, tls)), 'https');
  const h1 = setup(https.createServer(Object.assign({ALPNProtocols: ['http/1.1']}, tls)), 'h1tls');
  for (const s of [h2, h1]) s.on('tlsClientError', () => {});
  const ports = {
    http: await listen(plain),
    https: await listen(h2),
    h1tls: await listen(h1),
    raw: await listen(rawServer),
  };
  process.stdout.write(JSON.stringify(ports) + '\n');
}

main().catch((err) => {
  fail(err);
  process.exit(1);
});
