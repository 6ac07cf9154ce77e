'use strict';
// The Node client against a real netjaild, at $NETJAIL_SOCKET (the Python integration suite
// starts one and runs these: tests/integration/test_node_client.py).
const test = require('node:test');
const assert = require('node:assert/strict');

const netjail = require('..');
const { executeCode } = require('../examples/execute-code');

const socket = process.env.NETJAIL_SOCKET;
const skip = socket ? false : 'needs a netjaild at $NETJAIL_SOCKET';
const client = new netjail.Client({ socket, timeoutMs: 10000 });

async function gone(job) {
  for (let i = 0; i < 250; i++) {
    if (!(await client.ps()).some((info) => info.job === job)) return true;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return false;
}

test('run captures stdout and stderr, with the exit code', { skip }, async () => {
  const result = await client.run(['sh', '-c', 'echo out; echo err >&2; exit 3']);
  assert.equal(result.exitCode, 3);
  assert.equal(result.signal, null);
  assert.deepEqual(result.stdout, Buffer.from('out\n'));
  assert.deepEqual(result.stderr, Buffer.from('err\n'));
  assert.equal(result.report.job, result.job);
  assert.match(result.job, /^j-[0-9a-f]{8}$/);
});

test('a job that cats its stdin gets exactly the Buffer', { skip }, async () => {
  const payload = Buffer.alloc(300000);
  for (let i = 0; i < payload.length; i++) payload[i] = i % 256;
  const result = await client.run(['cat'], { stdin: payload });
  assert.equal(result.exitCode, 0);
  assert.ok(result.stdout.equals(payload));
});

test('a stdin payload over the bound is a ProtocolError, and no job starts', { skip }, async () => {
  await assert.rejects(
    client.run(['cat'], { stdin: Buffer.alloc(netjail.MAX_STDIN_BYTES + 1) }),
    (e) => e instanceof netjail.ProtocolError && /over the 524288-byte bound/.test(e.message),
  );
});

test('a command that cannot be executed is an ExecError with status 127', { skip }, async () => {
  await assert.rejects(
    client.run(['/nonexistent/tool']),
    (e) => e instanceof netjail.ExecError && e.exitCode === 127 && e.code === 'exec',
  );
});

test(
  'events come live from the job as an async iterator, and in the result',
  { skip },
  async () => {
    const job = await client.start(['bash', '-c', 'exec 3<>/dev/tcp/192.0.2.44/443']);
    const live = [];
    for await (const event of job) live.push(event);
    const result = await job.result;
    assert.deepEqual(
      live.map((e) => [e.kind, e.verdict, e.dst, e.port]),
      [['egress', 'blocked', '192.0.2.44', 443]],
    );
    assert.deepEqual(result.events, live);
    const history = [];
    for await (const event of client.events({ job: job.id })) history.push(event.dst);
    assert.deepEqual(history, ['192.0.2.44']);
  },
);

test('onEvent sees each event as it happens', { skip }, async () => {
  const seen = [];
  const result = await client.run(['bash', '-c', 'exec 3<>/dev/tcp/198.51.100.8/80'], {
    onEvent: (event) => seen.push(event.dst),
  });
  assert.deepEqual(seen, ['198.51.100.8']);
  assert.equal(result.events.length, 1);
});

test('kill signals a running job, and ps lists it while it runs', { skip }, async () => {
  const job = await client.start(['sleep', '60']);
  assert.ok((await client.ps()).some((info) => info.job === job.id));
  await job.kill(9);
  const result = await job.result;
  assert.equal(result.signal, 9);
  assert.equal(result.exitCode, null);
  await assert.rejects(client.kill('j-00000000'), netjail.NotFoundError);
});

test('aborting a run kills the job', { skip }, async () => {
  const controller = new AbortController();
  let id;
  const running = client.run(['sleep', '60'], {
    signal: controller.signal,
    onStart: (job) => {
      id = job;
      controller.abort();
    },
  });
  await assert.rejects(running, { name: 'AbortError' });
  assert.ok(await gone(id), `${id} still listed`);
});

test('status answers with the daemon counters', { skip }, async () => {
  const status = await client.status();
  assert.equal(typeof status.version, 'string');
  assert.ok(status.jobs_total >= 1);
});

test('no daemon is a DaemonConnectionError naming the socket', async () => {
  const missing = new netjail.Client({ socket: '/nonexistent/netjail.sock' });
  await assert.rejects(
    missing.ps(),
    (e) =>
      e instanceof netjail.DaemonConnectionError &&
      /cannot connect to \/nonexistent\/netjail\.sock: ENOENT/.test(e.message),
  );
});

test(
  "the README's executeCode lists a blocked name the code tried to fetch",
  { skip },
  async () => {
    process.env.NETJAIL_SOCKET = socket;
    // The README's example, as it is there.
    const result = await executeCode(`fetch('https://api.example.com/v1/charges').then(
  (r) => console.log(r.status), (e) => console.log('failed', e.cause.code))`);
    assert.equal(result.stdout, 'failed ENOTFOUND\n');
    assert.equal(result.exitCode, 0);
    assert.deepEqual(result.blocked, ['api.example.com']);
  },
);

test("the README's first example feeds a script to python3 on its stdin", { skip }, async () => {
  const result = await client.run(['python3', '-'], { stdin: 'print(6 * 7)\n', timeoutS: 10 });
  assert.equal(result.exitCode, 0);
  assert.equal(result.stdout.toString(), '42\n');
  assert.deepEqual(result.events, []);
});
