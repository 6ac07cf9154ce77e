'use strict';
// netjail's error tree, as in the Python library's netjail/errors.py, with the same wire codes.
//
//   NetjailError
//   ├── ProtocolError          a frame or message broke the wire protocol
//   ├── RequestError           a well-formed request that cannot be honoured
//   │   ├── PermissionDeniedError   the caller may not do this
//   │   ├── NotFoundError           no such job (or not one of the caller's)
//   │   ├── BusyError               the daemon is at a limit; retry later
//   │   └── BindSourceError         a bind source the client may not, or cannot, use
//   ├── DaemonConnectionError  the daemon could not be reached or went away (client side)
//   ├── ShutdownError          the daemon is stopping; what was running was ended
//   ├── JailError              the jail could not be built; the job did not start
//   │   ├── NetnsError, FirewallError, CgroupError, KmsgError
//   │   └── SpawnError
//   │       └── ExecError           the command could not be executed (exitCode 127/126)
//   ├── PoolExhaustedError     a job resolved more names than its synthetic pool holds
//   └── ConfigError            the daemon's configuration is invalid

class NetjailError extends Error {
  constructor(message) {
    // One line, always: messages can embed job-supplied text.
    super(String(message).split(/\s+/).filter(Boolean).join(' '));
    this.name = new.target.name;
  }
}
NetjailError.prototype.code = 'error';

function define(name, parent, code) {
  const cls = { [name]: class extends parent {} }[name];
  if (code !== undefined) cls.prototype.code = code;
  return cls;
}

const ProtocolError = define('ProtocolError', NetjailError, 'protocol');
const RequestError = define('RequestError', NetjailError, 'request');
const PermissionDeniedError = define('PermissionDeniedError', RequestError, 'permission');
const NotFoundError = define('NotFoundError', RequestError, 'not_found');
const BusyError = define('BusyError', RequestError, 'busy');
const BindSourceError = define('BindSourceError', RequestError);
const DaemonConnectionError = define('DaemonConnectionError', NetjailError, 'connection');
const ShutdownError = define('ShutdownError', NetjailError, 'shutdown');
const JailError = define('JailError', NetjailError, 'jail');
const NetnsError = define('NetnsError', JailError);
const FirewallError = define('FirewallError', JailError);
const CgroupError = define('CgroupError', JailError);
const KmsgError = define('KmsgError', JailError);
const SpawnError = define('SpawnError', JailError);
const PoolExhaustedError = define('PoolExhaustedError', NetjailError, 'pool_exhausted');
const ConfigError = define('ConfigError', NetjailError, 'config');

class ExecError extends SpawnError {
  constructor(message, exitCode) {
    super(message);
    /** The status a shell would give: 127 (not found) or 126 (not executable). */
    this.exitCode = exitCode;
  }
}
ExecError.prototype.code = 'exec';

const BY_CODE = new Map(
  [
    ProtocolError,
    RequestError,
    PermissionDeniedError,
    NotFoundError,
    BusyError,
    DaemonConnectionError,
    ShutdownError,
    JailError,
    PoolExhaustedError,
    ConfigError,
  ].map((cls) => [cls.prototype.code, cls]),
);

/** The error a daemon reported (an `error` message), as the class it stands for. */
function errorForCode(code, message, exitCode) {
  if (code === 'exec') return new ExecError(message, exitCode ?? 127);
  const cls = BY_CODE.get(code) ?? NetjailError;
  return new cls(message);
}

module.exports = {
  NetjailError,
  ProtocolError,
  RequestError,
  PermissionDeniedError,
  NotFoundError,
  BusyError,
  BindSourceError,
  DaemonConnectionError,
  ShutdownError,
  JailError,
  NetnsError,
  FirewallError,
  CgroupError,
  KmsgError,
  SpawnError,
  ExecError,
  PoolExhaustedError,
  ConfigError,
  errorForCode,
};
