'use strict';
// netjail's Node.js client: run commands in netjaild's jails over its Unix socket.
//
//   const { run } = require('netjail');
//   const result = await run(['sh', '-c', 'cat; echo done'], { stdin: 'hello\n' });
//   result.stdout.toString();   // 'hello\ndone\n'
//
// No dependencies: node:net and the JSON-lines protocol of lib/wire.js. One connection per
// request, as the daemon's replies are not numbered; closing a job's connection (its
// AbortSignal, or job.close()) makes the daemon kill the job.

const net = require('node:net');

const errors = require('./lib/errors');
const wire = require('./lib/wire');

const { DaemonConnectionError, ProtocolError } = errors;

const DEFAULT_SOCKET = '/run/netjail/netjail.sock';
const SOCKET_ENV = 'NETJAIL_SOCKET';
// Frames queued unread past which the socket stops reading, so that a slow consumer makes the
// daemon drop (and count) streamed events instead of this process buffering them all.
const PAUSE_AT = 1000;

function defaultSocket() {
  return process.env[SOCKET_ENV] || DEFAULT_SOCKET;
}

function abortReason(signal) {
  if (signal.reason !== undefined) return signal.reason;
  const error = new Error('The operation was aborted');
  error.name = 'AbortError';
  return error;
}

/** Call `onAbort` when `signal` aborts (now, if it has already); returns the undo. */
function whenAborted(signal, onAbort) {
  if (!signal) return () => {};
  const listener = () => onAbort(abortReason(signal));
  if (signal.aborted) listener();
  else signal.addEventListener('abort', listener, { once: true });
  return () => signal.removeEventListener('abort', listener);
}

/** One connection to the daemon: frames in order, each decoded when it is taken. */
class Connection {
  constructor(sock) {
    this.sock = sock;
    this.reader = new wire.FrameReader();
    this.frames = [];
    this.failure = null;
    this.wake = null;
    sock.on('data', (chunk) => {
      try {
        this.frames.push(...this.reader.feed(chunk));
      } catch (e) {
        this._fail(e);
        return;
      }
      if (this.frames.length >= PAUSE_AT) sock.pause();
      this._wake();
    });
    sock.on('error', (e) =>
      this._fail(
        new DaemonConnectionError(`lost the connection to netjaild: ${e.code || e.message}`),
      ),
    );
    sock.on('close', () => this._fail(new DaemonConnectionError('netjaild closed the connection')));
  }

  /** A greeted connection to the socket at `path`. */
  static async open(path, timeoutMs, signal) {
    const sock = net.createConnection({ path });
    await new Promise((resolve, reject) => {
      const timer = timeoutMs == null ? null : setTimeout(() => onError(null), timeoutMs);
      let undoAbort = () => {};
      function onError(e) {
        cleanup();
        sock.destroy();
        if (e === null) reject(new DaemonConnectionError('timed out waiting for netjaild'));
        else if (e instanceof Error && e.syscall === 'connect') {
          const hint =
            e.code === 'EACCES' ? 'are you root or in the netjail group?' : 'is netjaild running?';
          reject(
            new DaemonConnectionError(
              `cannot connect to ${path}: ${e.code || e.message} (${hint})`,
            ),
          );
        } else reject(e);
      }
      function onConnect() {
        cleanup();
        resolve();
      }
      function cleanup() {
        if (timer) clearTimeout(timer);
        sock.off('error', onError);
        sock.off('connect', onConnect);
        undoAbort();
      }
      sock.once('error', onError);
      sock.once('connect', onConnect);
      undoAbort = whenAborted(signal, onError);
    });
    const conn = new Connection(sock);
    try {
      conn.send(wire.helloRequest());
      const hello = await conn.next(timeoutMs);
      if (hello.op !== 'hello')
        throw new ProtocolError(`expected hello from the daemon, got ${hello.op}`);
    } catch (e) {
      conn.close();
      throw e;
    }
    return conn;
  }

  send(request) {
    this.sock.write(wire.encodeRequest(request));
  }

  /** The next message (waiting at most `timeoutMs`, or for ever when null). */
  async next(timeoutMs = null) {
    while (this.frames.length === 0) {
      if (this.failure) throw this.failure;
      await new Promise((resolve, reject) => {
        const timer =
          timeoutMs == null
            ? null
            : setTimeout(() => {
                this.wake = null;
                this.close();
                reject(new DaemonConnectionError('timed out waiting for netjaild'));
              }, timeoutMs);
        this.wake = () => {
          if (timer) clearTimeout(timer);
          resolve();
        };
      });
    }
    const frame = this.frames.shift();
    if (this.frames.length < PAUSE_AT / 10 && this.sock.isPaused()) this.sock.resume();
    return wire.decodeReply(frame);
  }

  _wake() {
    const wake = this.wake;
    this.wake = null;
    if (wake) wake();
  }

  _fail(error) {
    if (!this.failure) this.failure = error;
    this.sock.destroy();
    this._wake();
  }

  close() {
    this.failure ??= new DaemonConnectionError('the connection was closed');
    this.sock.destroy();
  }
}

/** A job the daemon has started: its live events (`for await`), its result, kill and close. */
class Job {
  constructor(conn, started, options, client) {
    this.id = started.job;
    this.pid = started.pid;
    /** Where the job started, when not in the cwd asked for (cwdFallback "home"). */
    this.cwd = started.cwd ?? null;
    this._conn = conn;
    this._client = client;
    this._events = [];
    this._ended = false;
    this._wake = null;
    this._onEvent = options.onEvent;
    this._keep = options.keepEvents;
    this.result = this._pump(options.signal);
    // Rejections reach whoever awaits `result`; without this, an unawaited one is "unhandled".
    this.result.catch(() => {});
  }

  async _pump(signal) {
    // Aborted already (e.g. from onStart) counts too: whenAborted calls back at once then.
    const undo = whenAborted(signal, (reason) => this._conn._fail(reason));
    try {
      for (;;) {
        const message = await this._conn.next();
        if (message.op === 'exit') return wire.resultOf(message);
        if (message.op !== 'event')
          throw new ProtocolError(`unexpected ${message.op} during a job`);
        if (this._onEvent) this._onEvent(message.event);
        if (this._keep) {
          this._events.push(message.event);
          this._notify();
        }
      }
    } finally {
      undo();
      this._ended = true;
      this._notify();
      this._conn.close();
    }
  }

  _notify() {
    const wake = this._wake;
    this._wake = null;
    if (wake) wake();
  }

  /** The job's events as they happen; the iteration ends when the job does. */
  async *[Symbol.asyncIterator]() {
    for (;;) {
      if (this._events.length) {
        yield this._events.shift();
      } else if (this._ended) {
        await this.result; // the job's error, if it ended with one
        return;
      } else {
        await new Promise((resolve) => {
          this._wake = resolve;
        });
      }
    }
  }

  /** Send `signal` (default SIGTERM, 15) to the job; 9 kills all its processes. */
  kill(signal = 15) {
    return this._client.kill(this.id, signal);
  }

  /** Close the job's connection: the daemon kills the job. */
  close() {
    this._conn.close();
  }
}

class Client {
  /**
   * @param {{socket?: string, timeoutMs?: number | null}} [options] `timeoutMs` bounds each
   *   wait for a daemon message outside a running job (default 30 s; null: no bound).
   */
  constructor({ socket, timeoutMs = 30000 } = {}) {
    this.socket = socket || defaultSocket();
    this.timeoutMs = timeoutMs;
  }

  _connect(signal) {
    return Connection.open(this.socket, this.timeoutMs, signal);
  }

  /** Start `argv` in a jail; resolves once it runs, with a Job for its events and result. */
  async start(argv, options = {}) {
    return this._start(argv, options, { stream: true, keep: true });
  }

  /** Run `argv` in a jail and wait for it to end. */
  async run(argv, options = {}) {
    const job = await this._start(argv, options, { stream: Boolean(options.onEvent), keep: false });
    return job.result;
  }

  // stream: the daemon sends events live; keep: the Job queues them for its iterator.
  async _start(argv, options, { stream, keep }) {
    const request = wire.runRequest(argv, options, stream);
    options.signal?.throwIfAborted?.();
    const conn = await this._connect(options.signal);
    let started;
    try {
      conn.send(request);
      const undo = whenAborted(options.signal, (reason) => conn._fail(reason));
      try {
        started = await conn.next(this.timeoutMs);
      } finally {
        undo();
      }
      if (started.op !== 'started')
        throw new ProtocolError(`expected started from the daemon, got ${started.op}`);
    } catch (e) {
      conn.close();
      throw e;
    }
    if (options.onStart) options.onStart(started.job, started.pid);
    return new Job(conn, started, { ...options, keepEvents: keep }, this);
  }

  /** Events of the caller's jobs (root: all), oldest first; with `follow`, until aborted. */
  async *events({ job, follow = false, signal } = {}) {
    const conn = await this._connect(signal);
    const undo = whenAborted(signal, (reason) => conn._fail(reason));
    try {
      const request = { op: 'events' };
      if (job !== undefined) request.job = job;
      if (follow) request.follow = true;
      conn.send(request);
      for (;;) {
        const message = await conn.next(follow ? null : this.timeoutMs);
        if (message.op === 'end') return;
        if (message.op !== 'event')
          throw new ProtocolError(`unexpected ${message.op} among events`);
        yield message.event;
      }
    } finally {
      undo();
      conn.close();
    }
  }

  async _ask(request, op) {
    const conn = await this._connect();
    try {
      conn.send(request);
      const reply = await conn.next(this.timeoutMs);
      if (reply.op !== op)
        throw new ProtocolError(`expected ${op} from the daemon, got ${reply.op}`);
      return reply;
    } finally {
      conn.close();
    }
  }

  /** Running jobs the caller may see. */
  async ps() {
    return (await this._ask({ op: 'ps' }, 'ps')).jobs;
  }

  /** The daemon's version, uptime and counters. */
  async status() {
    const { op: _op, ...status } = await this._ask({ op: 'status' }, 'status');
    return status;
  }

  /** Send `signal` to a job (default SIGTERM, 15; 9 kills all its processes). */
  async kill(job, signal = 15) {
    await this._ask({ op: 'kill', job, signal }, 'killed');
  }
}

let shared = null;
function defaultClient() {
  shared ??= new Client();
  return shared;
}

function run(argv, options) {
  return defaultClient().run(argv, options);
}
function start(argv, options) {
  return defaultClient().start(argv, options);
}
function events(options) {
  return defaultClient().events(options);
}
function ps() {
  return defaultClient().ps();
}
function status() {
  return defaultClient().status();
}
function kill(job, signal) {
  return defaultClient().kill(job, signal);
}

const { PROTOCOL_VERSION, MAX_STDIN_BYTES } = wire;

// Shorthand names and a spread require only, so that Node's ESM loader sees every named export.
module.exports = {
  Client,
  Job,
  run,
  start,
  events,
  ps,
  status,
  kill,
  DEFAULT_SOCKET,
  SOCKET_ENV,
  PROTOCOL_VERSION,
  MAX_STDIN_BYTES,
  ...require('./lib/errors'),
};
