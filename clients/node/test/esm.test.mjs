// The CommonJS package imported from ES modules: every named export is there.
import test from 'node:test';
import assert from 'node:assert/strict';

import * as netjail from 'netjail';

test('ES modules import the named exports, the same objects as require gives', async () => {
  const { createRequire } = await import('node:module');
  const required = createRequire(import.meta.url)('netjail');
  for (const name of [
    'run',
    'start',
    'events',
    'ps',
    'status',
    'kill',
    'Client',
    'ExecError',
    'MAX_STDIN_BYTES',
  ]) {
    assert.equal(netjail[name], required[name], name);
  }
  assert.ok(new netjail.NotFoundError('x') instanceof netjail.NetjailError);
});
