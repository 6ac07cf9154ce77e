'use strict';
// The wire protocol without a daemon: framing, lenient replies, strict requests, errors.
const test = require('node:test');
const assert = require('node:assert/strict');

const netjail = require('..');
const wire = require('../lib/wire');

test('frames cut anywhere by reads come out whole and in order', () => {
  const reader = new wire.FrameReader(64);
  const data = Buffer.from('{"op":"a"}\n{"op":"b"}\n{"op"');
  const frames = [];
  for (let i = 0; i < data.length; i += 3) frames.push(...reader.feed(data.subarray(i, i + 3)));
  assert.deepEqual(frames.map(String), ['{"op":"a"}', '{"op":"b"}']);
  assert.deepEqual(reader.feed(Buffer.from(':"c"}\n')).map(String), ['{"op":"c"}']);
});

test('a frame over the bound is a ProtocolError, with or without its newline', () => {
  assert.throws(
    () => new wire.FrameReader(8).feed(Buffer.from('123456789\n')),
    netjail.ProtocolError,
  );
  assert.throws(
    () => new wire.FrameReader(8).feed(Buffer.from('123456789')),
    /frame larger than 8 bytes/,
  );
});

test('replies keep fields this client does not know', () => {
  const reply = wire.decodeReply(Buffer.from('{"op":"started","job":"j-1","pid":2,"tty":"pts/1"}'));
  assert.deepEqual(reply, { op: 'started', job: 'j-1', pid: 2, tty: 'pts/1' });
});

test('an unknown op, or JSON that is not an object, is a ProtocolError', () => {
  assert.throws(() => wire.decodeReply(Buffer.from('{"op":"nope"}')), /unknown or missing op/);
  assert.throws(() => wire.decodeReply(Buffer.from('[1]')), netjail.ProtocolError);
  assert.throws(() => wire.decodeReply(Buffer.from('{')), /bad message from daemon/);
});

test('a daemon error is thrown as the class of its code, as in Python', () => {
  const cases = {
    protocol: netjail.ProtocolError,
    request: netjail.RequestError,
    permission: netjail.PermissionDeniedError,
    not_found: netjail.NotFoundError,
    busy: netjail.BusyError,
    connection: netjail.DaemonConnectionError,
    shutdown: netjail.ShutdownError,
    jail: netjail.JailError,
    pool_exhausted: netjail.PoolExhaustedError,
    config: netjail.ConfigError,
    something_new: netjail.NetjailError,
  };
  for (const [code, cls] of Object.entries(cases)) {
    const frame = Buffer.from(JSON.stringify({ op: 'error', code, message: 'what\nand why' }));
    assert.throws(
      () => wire.decodeReply(frame),
      (e) => e.constructor === cls && e.message === 'what and why',
    );
  }
  assert.ok(new netjail.NotFoundError('x') instanceof netjail.RequestError);
  assert.equal(new netjail.NotFoundError('x').code, 'not_found');
  assert.equal(new netjail.BindSourceError('x').code, 'request');
});

test('an exec error keeps the exit status a shell would give', () => {
  const frame = Buffer.from('{"op":"error","code":"exec","message":"not found","exit_code":127}');
  assert.throws(
    () => wire.decodeReply(frame),
    (e) => e instanceof netjail.ExecError && e instanceof netjail.JailError && e.exitCode === 127,
  );
});

test('a run request carries only the fields that were set, in the wire names', () => {
  const request = wire.runRequest(
    ['sh', '-c', 'true'],
    { timeoutS: 5, addHosts: ['a.test:192.0.2.1'] },
    false,
  );
  assert.deepEqual(request, {
    op: 'run',
    argv: ['sh', '-c', 'true'],
    timeout_s: 5,
    add_hosts: ['a.test:192.0.2.1'],
    stdio: 'capture',
    events: false,
  });
});

test('the interception options go in the wire names, as the CLI texts', () => {
  const request = wire.runRequest(
    ['curl', 'https://api.example.test/'],
    {
      intercept: ['api.example.test'],
      mocks: ['GET api.example.test/v1/*=200:{}'],
      denyRequests: ['POST api.example.test/*'],
      allowRequests: ['GET api.example.test/*'],
      redact: ['api.example.test:token'],
      injectHeaders: ['api.example.test:Authorization=Bearer x'],
    },
    false,
  );
  assert.deepEqual(
    Object.keys(request).filter((key) => !['op', 'argv', 'stdio', 'events'].includes(key)),
    ['intercept', 'mocks', 'deny_requests', 'allow_requests', 'redact', 'inject_headers'],
  );
});

test('stdin goes as base64; over the bound, or without capture, it is refused', () => {
  const request = wire.runRequest(['cat'], { stdin: Buffer.from([0, 255, 10]) }, false);
  assert.equal(request.stdin, 'AP8K');
  assert.equal(
    wire.runRequest(['cat'], { stdin: 'hé' }, false).stdin,
    Buffer.from('hé').toString('base64'),
  );
  assert.throws(
    () => wire.runRequest(['cat'], { stdin: Buffer.alloc(netjail.MAX_STDIN_BYTES + 1) }, false),
    (e) => e instanceof netjail.ProtocolError && /over the 524288-byte bound/.test(e.message),
  );
  assert.throws(
    () => wire.runRequest(['cat'], { stdin: 'x', stdio: 'null' }, false),
    /needs stdio "capture"/,
  );
});

test('a misspelt option or a bad argv is a TypeError, not a silent default', () => {
  assert.throws(
    () => wire.runRequest(['true'], { timeout: 5 }, false),
    /unknown run option: timeout/,
  );
  assert.throws(() => wire.runRequest([], {}, false), TypeError);
  assert.throws(
    () => wire.runRequest(['true'], { stdio: 'fds' }, false),
    /cannot pass file descriptors/,
  );
});

test('a request over the frame bound fails before it is sent', () => {
  const request = wire.runRequest(
    ['cat', '\u0001'.repeat(60000)],
    { stdin: Buffer.alloc(netjail.MAX_STDIN_BYTES) },
    false,
  );
  assert.throws(() => wire.encodeRequest(request), /over the protocol's 1048576-byte frame bound/);
});

test('a result gives the report with captured output as Buffers', () => {
  const result = wire.resultOf({
    op: 'exit',
    dropped_events: 2,
    report: {
      job: 'j-1',
      exit_code: 0,
      signal: null,
      stdout: 'aGkK',
      stderr: '',
      events: [],
      lost_events: 0,
      new_field: 1,
    },
  });
  assert.deepEqual(result.stdout, Buffer.from('hi\n'));
  assert.deepEqual(result.stderr, Buffer.alloc(0));
  assert.equal(result.droppedEvents, 2);
  assert.equal(result.report.new_field, 1);
});
