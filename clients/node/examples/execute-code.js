const { run } = require('netjail');

/** Run JavaScript `code` with `node -e` in a jail: what it printed, and what it tried to reach. */
async function executeCode(code, { allow = [], timeoutS = 10 } = {}) {
  const result = await run(['/usr/bin/node', '-e', code], {
    allow, // e.g. ['registry.npmjs.org']; with none, nothing goes out
    timeoutS,
    memoryBytes: 512 * 2 ** 20,
  });
  // Each blocked attempt by name: the domain when it was one (DNS or a proxied connection),
  // else the address it tried.
  const blocked = new Set();
  for (const event of result.events) {
    if (event.verdict === 'blocked') blocked.add(event.domain ?? event.dst);
  }
  return {
    stdout: result.stdout.toString(),
    stderr: result.stderr.toString(),
    exitCode: result.exitCode, // null when a signal ended it (result.signal), e.g. the timeout
    blocked: [...blocked],
  };
}

module.exports = { executeCode };
