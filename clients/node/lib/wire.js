'use strict';
// The wire protocol, without I/O: one JSON object per line in each direction, as netjaild's
// src/netjail/protocol.py (with requests.py and replies.py) defines it. Requests carry only the fields the caller set (the daemon
// refuses unknown fields, so a field an older daemon lacks is never sent unasked); replies are
// read leniently, so fields a newer daemon adds pass through untouched.

const { ProtocolError, errorForCode } = require('./errors');

const PROTOCOL_VERSION = 1;
/** Largest request frame the daemon accepts, newline included. */
const MAX_FRAME_BYTES = 1 << 20;
/** Largest daemon frame this client accepts (a report with captured output and many events). */
const MAX_REPLY_BYTES = 64 << 20;
/** Most bytes a run request's stdin payload may hold (the daemon's MAX_STDIN_BYTES). */
const MAX_STDIN_BYTES = 512 << 10;

const REPLY_OPS = new Set([
  'hello',
  'started',
  'event',
  'exit',
  'error',
  'ps',
  'status',
  'killed',
  'end',
]);

/** Splits a byte stream into newline-terminated frames of bounded size. */
class FrameReader {
  constructor(maxFrame = MAX_REPLY_BYTES) {
    this.maxFrame = maxFrame;
    this.chunks = [];
    this.size = 0;
  }

  /** Add received bytes; return the complete frames (without newline), in order. */
  feed(chunk) {
    const frames = [];
    let start = 0;
    for (;;) {
      const end = chunk.indexOf(0x0a, start);
      if (end < 0) break;
      const piece = chunk.subarray(start, end);
      if (this.size + piece.length + 1 > this.maxFrame) {
        throw new ProtocolError(`frame larger than ${this.maxFrame} bytes`);
      }
      frames.push(this.chunks.length ? Buffer.concat([...this.chunks, piece]) : piece);
      this.chunks = [];
      this.size = 0;
      start = end + 1;
    }
    if (start < chunk.length) {
      this.chunks.push(chunk.subarray(start));
      this.size += chunk.length - start;
      if (this.size > this.maxFrame) {
        throw new ProtocolError(`frame larger than ${this.maxFrame} bytes`);
      }
    }
    return frames;
  }
}

/** One daemon frame as a message object; a daemon `error` is thrown as its error class. */
function decodeReply(frame) {
  let message;
  try {
    message = JSON.parse(frame.toString('utf8'));
  } catch (e) {
    throw new ProtocolError(`bad message from daemon: ${e.message}`);
  }
  if (message === null || typeof message !== 'object' || Array.isArray(message)) {
    throw new ProtocolError('bad message from daemon: not an object');
  }
  if (!REPLY_OPS.has(message.op)) {
    throw new ProtocolError('bad message from daemon: unknown or missing op');
  }
  if (message.op === 'error') {
    throw errorForCode(
      String(message.code),
      String(message.message),
      message.exit_code ?? undefined,
    );
  }
  return message;
}

/** A request object as a frame: compact JSON and a newline, within the daemon's bound. */
function encodeRequest(request) {
  const frame = Buffer.from(JSON.stringify(request) + '\n', 'utf8');
  if (frame.length > MAX_FRAME_BYTES) {
    throw new ProtocolError(
      `request of ${frame.length} bytes is over the protocol's ${MAX_FRAME_BYTES}-byte frame ` +
        'bound: send less argv, env or stdin',
    );
  }
  return frame;
}

function helloRequest() {
  return { op: 'hello', version: PROTOCOL_VERSION, client: 'netjail-node' };
}

// Option name → wire field, for the run options that map one to one.
const RUN_FIELDS = {
  env: 'env',
  cwd: 'cwd',
  uid: 'uid',
  gid: 'gid',
  captureBytes: 'capture_bytes',
  memoryBytes: 'memory_bytes',
  cpus: 'cpus',
  pids: 'pids',
  timeoutS: 'timeout_s',
  killGraceS: 'kill_grace_s',
  allow: 'allow',
  deny: 'deny',
  addHosts: 'add_hosts',
  binds: 'binds',
  hostname: 'hostname',
  cwdFallback: 'cwd_fallback',
  // Interception: the CLI's texts, as the Python client takes them (README, "Seeing inside TLS").
  intercept: 'intercept',
  mocks: 'mocks',
  denyRequests: 'deny_requests',
  allowRequests: 'allow_requests',
  redact: 'redact',
  injectHeaders: 'inject_headers',
};
// Options of run() and start() that are not request fields.
const CLIENT_OPTIONS = new Set(['stdio', 'stdin', 'onEvent', 'onStart', 'signal']);

function toBuffer(data) {
  if (typeof data === 'string') return Buffer.from(data, 'utf8');
  if (data instanceof Uint8Array) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError('stdin must be a Buffer, a Uint8Array or a string');
}

/** The `run` request for argv and options; TypeError for a misspelt option or argv. */
function runRequest(argv, options, events) {
  if (!Array.isArray(argv) || argv.length === 0 || !argv.every((a) => typeof a === 'string')) {
    throw new TypeError('argv must be a non-empty array of strings');
  }
  const request = { op: 'run', argv };
  for (const [name, value] of Object.entries(options)) {
    if (value === undefined) continue;
    if (name in RUN_FIELDS) request[RUN_FIELDS[name]] = value;
    else if (!CLIENT_OPTIONS.has(name)) throw new TypeError(`unknown run option: ${name}`);
  }
  const stdio = options.stdio ?? 'capture';
  if (stdio !== 'capture' && stdio !== 'null') {
    throw new TypeError('stdio must be "capture" or "null" (Node cannot pass file descriptors)');
  }
  request.stdio = stdio;
  request.events = events;
  if (options.stdin !== undefined && options.stdin !== null) {
    const data = toBuffer(options.stdin);
    if (stdio !== 'capture') {
      throw new ProtocolError(
        `a stdin payload needs stdio "capture" (this request has "${stdio}")`,
      );
    }
    if (data.length > MAX_STDIN_BYTES) {
      throw new ProtocolError(
        `stdin payload of ${data.length} bytes is over the ${MAX_STDIN_BYTES}-byte bound ` +
          '(512 KiB): pass larger input through a file (binds)',
      );
    }
    request.stdin = data.toString('base64');
  }
  return request;
}

function fromBase64(value) {
  return typeof value === 'string' ? Buffer.from(value, 'base64') : null;
}

/** A job's result from its `exit` message: the report's main facts at hand. */
function resultOf(exit) {
  const report = {
    ...exit.report,
    stdout: fromBase64(exit.report.stdout),
    stderr: fromBase64(exit.report.stderr),
  };
  return {
    job: report.job,
    exitCode: report.exit_code,
    signal: report.signal,
    stdout: report.stdout,
    stderr: report.stderr,
    stdoutTruncated: Boolean(report.stdout_truncated),
    stderrTruncated: Boolean(report.stderr_truncated),
    timedOut: Boolean(report.timed_out),
    oomKilled: Boolean(report.oom_killed),
    events: report.events,
    lostEvents: report.lost_events,
    droppedEvents: exit.dropped_events ?? 0,
    report,
  };
}

module.exports = {
  PROTOCOL_VERSION,
  MAX_FRAME_BYTES,
  MAX_REPLY_BYTES,
  MAX_STDIN_BYTES,
  FrameReader,
  decodeReply,
  encodeRequest,
  helloRequest,
  runRequest,
  resultOf,
};
