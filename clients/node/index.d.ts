// Type declarations for netjail's Node.js client (hand-written; the package is plain CommonJS).
// Event, Report, JobInfo and Status use the wire names (snake_case) of the protocol's schemas,
// documented in netjail's README; later daemons add fields, never rename these.

/// <reference types="node" />

export const DEFAULT_SOCKET: string;
export const SOCKET_ENV: string;
export const PROTOCOL_VERSION: number;
/** Most bytes a stdin payload may hold: 524288 (512 KiB). */
export const MAX_STDIN_BYTES: number;

export type EventKind = 'egress' | 'dns' | 'http';
export type Verdict = 'allowed' | 'blocked' | 'redirected' | 'mocked';
export type Via = 'nflog' | 'kmsg' | 'dns' | 'proxy';

/** The process that sent an event: pid inside the job's PID namespace, sanitised names. */
export interface EventProcess {
  pid: number;
  comm: string;
  exe?: string | null;
  argv?: string[];
}

/** One egress attempt (a packet, a DNS query or a proxied connection) seen for a job. */
export interface Event {
  job: string;
  time: string;
  kind: EventKind;
  verdict: Verdict;
  proto: string | number | null;
  family: number | null;
  dst: string | null;
  port: number | null;
  uid: number | null;
  count: number;
  via: Via;
  domain?: string | null;
  qtype?: string | null;
  reason?: string | null;
  bytes_out?: number | null;
  bytes_in?: number | null;
  detail?: string | null;
  /** An "http" event's request: method, path (no query), the status the job got, its time. */
  method?: string | null;
  path?: string | null;
  status?: number | null;
  duration_ms?: number | null;
  /** Who sent it, when the daemon could tell (absent when the process was already gone). */
  process?: EventProcess | null;
  /** Fields a newer daemon adds. */
  [field: string]: unknown;
}

export interface AppliedLimits {
  memory_bytes: number | null;
  cpus: number | null;
  pids: number | null;
  timeout_s: number | null;
  kill_grace_s: number;
}

export interface DomainSummary {
  allowed: number;
  blocked: number;
  mocked: number;
  bytes_out: number;
  bytes_in: number;
}

/** A job's final report; captured output as Buffers (base64 on the wire). */
export interface Report {
  job: string;
  argv: string[];
  uid: number;
  gid: number;
  exit_code: number | null;
  signal: number | null;
  wall_s: number;
  events: Event[];
  lost_events: number;
  stdout: Buffer | null;
  stderr: Buffer | null;
  stdout_truncated: boolean;
  stderr_truncated: boolean;
  timed_out: boolean;
  oom_killed: boolean;
  cpu_user_s: number | null;
  cpu_system_s: number | null;
  memory_peak_bytes: number | null;
  pids_peak: number | null;
  limits: AppliedLimits | null;
  domains: Record<string, DomainSummary>;
  seccomp_profile: string | null;
  events_not_kept: Record<string, number>;
  [field: string]: unknown;
}

/** What a finished job did: its report, with its main facts at hand. */
export interface Result {
  job: string;
  /** null when a signal ended it. */
  exitCode: number | null;
  signal: number | null;
  /** null with stdio "null". */
  stdout: Buffer | null;
  stderr: Buffer | null;
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
  timedOut: boolean;
  oomKilled: boolean;
  events: Event[];
  lostEvents: number;
  /** Events not streamed live because this client read too slowly (all are in `events`). */
  droppedEvents: number;
  report: Report;
}

export interface BindMount {
  source: string;
  target?: string;
  access?: 'ro' | 'rw';
}

export interface RunOptions {
  /** "capture" (default): stdout and stderr in the result; "null": /dev/null. */
  stdio?: 'capture' | 'null';
  /** What the job reads on its stdin, then end of file (capture mode; at most 512 KiB). */
  stdin?: Buffer | Uint8Array | string;
  env?: Record<string, string>;
  cwd?: string;
  cwdFallback?: 'error' | 'home';
  uid?: number;
  gid?: number;
  captureBytes?: number;
  memoryBytes?: number;
  cpus?: number;
  pids?: number;
  timeoutS?: number;
  killGraceS?: number;
  /** Policy rules: "pypi.org", "*.github.com:443", "10.0.0.0/8:5432". None: nothing goes out. */
  allow?: string[];
  deny?: string[];
  /** "NAME:IP" pairs the proxy uses instead of DNS. */
  addHosts?: string[];
  binds?: BindMount[];
  hostname?: string;
  /** Interception (README, "Seeing inside TLS"): names whose TLS the proxy terminates, and
   * per-request rules, as the CLI's --intercept, --mock, --deny-request, --allow-request,
   * --redact and --inject-header texts (no $VAR or @FILE expansion here). */
  intercept?: string[];
  mocks?: string[];
  denyRequests?: string[];
  allowRequests?: string[];
  redact?: string[];
  injectHeaders?: string[];
  /** Called for each event as it happens (events are streamed only when given, or with start). */
  onEvent?: (event: Event) => void;
  /** Called with the job id and pid once the job runs. */
  onStart?: (job: string, pid: number) => void;
  /** Aborting kills the job; the promise rejects with the signal's reason. */
  signal?: AbortSignal;
}

export interface JobInfo {
  job: string;
  argv: string[];
  uid: number;
  gid: number;
  pid: number | null;
  owner_uid: number;
  started: string;
  events: number;
  [field: string]: unknown;
}

export interface Status {
  version: string;
  pid: number;
  uptime_s: number;
  jobs_running: number;
  jobs_total: number;
  events_seen: number;
  events_lost: number;
  cgroup_mode?: string | null;
  seccomp_profile?: string | null;
  [field: string]: unknown;
}

export interface EventsOptions {
  job?: string;
  /** After the history, new events until aborted. */
  follow?: boolean;
  signal?: AbortSignal;
}

/** A running job: `for await (const event of job)` gives its events live, until it ends. */
export class Job implements AsyncIterable<Event> {
  readonly id: string;
  readonly pid: number;
  /** Where the job started, when not in the cwd asked for (cwdFallback "home"). */
  readonly cwd: string | null;
  /** Settles when the job ends. */
  readonly result: Promise<Result>;
  [Symbol.asyncIterator](): AsyncIterator<Event>;
  /** Signal the job (default 15, SIGTERM; 9 kills all its processes). */
  kill(signal?: number): Promise<void>;
  /** Close the job's connection: the daemon kills the job. */
  close(): void;
}

export interface ClientOptions {
  /** Default: $NETJAIL_SOCKET, then /run/netjail/netjail.sock. */
  socket?: string;
  /** Bound on each wait for the daemon outside a running job; default 30000, null: none. */
  timeoutMs?: number | null;
}

export class Client {
  constructor(options?: ClientOptions);
  readonly socket: string;
  timeoutMs: number | null;
  run(argv: string[], options?: RunOptions): Promise<Result>;
  start(argv: string[], options?: RunOptions): Promise<Job>;
  events(options?: EventsOptions): AsyncGenerator<Event, void, undefined>;
  ps(): Promise<JobInfo[]>;
  status(): Promise<Status>;
  kill(job: string, signal?: number): Promise<void>;
}

/** The same, on a client for the default socket. */
export function run(argv: string[], options?: RunOptions): Promise<Result>;
export function start(argv: string[], options?: RunOptions): Promise<Job>;
export function events(options?: EventsOptions): AsyncGenerator<Event, void, undefined>;
export function ps(): Promise<JobInfo[]>;
export function status(): Promise<Status>;
export function kill(job: string, signal?: number): Promise<void>;

/** Wire error codes, as the Python library's. */
export type ErrorCode =
  | 'error'
  | 'protocol'
  | 'request'
  | 'permission'
  | 'not_found'
  | 'busy'
  | 'connection'
  | 'shutdown'
  | 'jail'
  | 'exec'
  | 'pool_exhausted'
  | 'config';

export class NetjailError extends Error {
  constructor(message: string);
  readonly code: ErrorCode;
}
export class ProtocolError extends NetjailError {}
export class RequestError extends NetjailError {}
export class PermissionDeniedError extends RequestError {}
export class NotFoundError extends RequestError {}
export class BusyError extends RequestError {}
export class BindSourceError extends RequestError {}
export class DaemonConnectionError extends NetjailError {}
export class ShutdownError extends NetjailError {}
export class JailError extends NetjailError {}
export class NetnsError extends JailError {}
export class FirewallError extends JailError {}
export class CgroupError extends JailError {}
export class KmsgError extends JailError {}
export class SpawnError extends JailError {}
export class ExecError extends SpawnError {
  constructor(message: string, exitCode: number);
  /** 127 (not found) or 126 (not executable), as a shell gives. */
  readonly exitCode: number;
}
export class PoolExhaustedError extends NetjailError {}
export class ConfigError extends NetjailError {}

/** The error a daemon reported, as the class its code stands for. */
export function errorForCode(code: string, message: string, exitCode?: number): NetjailError;
