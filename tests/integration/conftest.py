"""A real netjaild on a temporary socket, and checks that nothing leaks."""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from netjail import Client
from netjail.mountinfo import parse_mounts
from netjail.protocol import Report

from .upstream import Upstream, upstream_servers

TEST_USER = "netjail-test"
TEST_GROUP = "netjail"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


if os.geteuid() != 0:
    pytest.skip("integration tests need root", allow_module_level=True)


def netjail_netns() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith("netjail-"))
    except FileNotFoundError:
        return []


def netjail_job_cgroups() -> list[str]:
    found = []
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        for d in dirs:
            if d.startswith("j-") and "netjail" in root:
                found.append(os.path.join(root, d))
    return found


@dataclass
class Daemon:
    socket: str
    state_dir: str
    process: subprocess.Popen[bytes]
    log_path: str
    #: The uids its root jobs lease (its config's ``[jail] job_uids``), no other daemon's.
    job_uids: range
    known_jobs: set[str] = field(default_factory=set)
    #: Where this run's lines start in a log file a previous run may have written to.
    log_offset: int = 0
    #: What of its jobs was left in its state directory once it stopped (None: not looked yet).
    leftovers: list[str] | None = None

    def client(self) -> Client:
        return Client(self.socket, timeout=10)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def job_ids(self) -> set[str]:
        """Every job this daemon started, from its log (kept once the log is removed)."""
        if os.path.exists(self.log_path):
            self.known_jobs = set(re.findall(r"job started job=(j-[0-9a-f]+)", self.log()))
        return self.known_jobs


#: Every daemon the suite started, for the leak check at the end.
STARTED: list[Daemon] = []


def processes_of_jobs(job_ids: set[str]) -> list[str]:
    """Processes still in the cgroup of one of these jobs (exactly ours, whoever else runs)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                groups = f.read()
        except OSError:
            continue
        if any(f"/{job}\n" in groups or groups.endswith(f"/{job}") for job in job_ids):
            found.append(pid)
    return found


def processes_at_report(job_ids: set[str]) -> list[str]:
    """What ``processes_of_jobs`` finds when the jobs' reports came (there must be nothing)
    but their inits: PID 1 of a job's namespace, whose own exit may still be under way then
    (it killed and reaped the rest of the job before it said the job ended)."""
    return [pid for pid in processes_of_jobs(job_ids) if _left_at_report(pid)]


def _left_at_report(pid: str) -> bool:
    """Whether ``pid`` is still there and not PID 1 of its PID namespace. One gone since it
    was listed is not left: an ending init may finish exiting in between."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
    return nspid.split()[-1] != "1"


def home_mounts(under: str) -> list[str]:
    """Mount points of job HOMEs (the daemon's "netjail-home" tmpfs) at or below ``under``.

    Read from this process's mount namespace, which is every daemon's: none is started in a
    mount namespace of its own.
    """
    with open("/proc/self/mountinfo") as f:
        mounts = parse_mounts(f.read())
    return [
        m.mount_point
        for m in mounts
        if m.source == "netjail-home" and (m.mount_point + "/").startswith(under + "/")
    ]


def state_mounts(state_dirs: set[str]) -> list[str]:
    """Which of ``state_dirs`` still have the daemon's own state tmpfs mounted on them."""
    with open("/proc/self/mountinfo") as f:
        mounts = parse_mounts(f.read())
    dirs = {os.path.realpath(d) for d in state_dirs}
    return sorted(
        {m.mount_point for m in mounts if m.source == "netjail-state" and m.mount_point in dirs}
    )


def state_leftovers(state_dir: str) -> list[str]:
    """What of its jobs is left in a daemon's state directory: a HOME (its directory under
    homes/, or its mount), a uid lease (a file under uids/) or a job's record (jobs/<job>.json,
    kept while its cgroup could not be removed; a pool jail's is there while it is warm). A
    stopped daemon leaves none."""
    found = home_mounts(os.path.join(state_dir, "homes"))
    for part in ("homes", "uids", "jobs"):
        directory = os.path.join(state_dir, part)
        with contextlib.suppress(FileNotFoundError):
            found += [os.path.join(directory, name) for name in sorted(os.listdir(directory))]
    return found


def note_stopped(daemon: Daemon) -> None:
    """Once ``daemon`` has exited, before its directory goes: remember what it left behind
    (its jobs, and its state's leftovers) for the suite's leak check."""
    assert daemon.process.poll() is not None, "note_stopped needs a daemon that has exited"
    daemon.job_ids()
    left = state_leftovers(daemon.state_dir)
    # Each with what the log said of its job: the log goes with the test's directory.
    lines = daemon.log().splitlines() if left else []
    daemon.leftovers = [
        " | ".join([path, *[line for line in lines if _leftover_job(path) in line][-8:]])
        for path in left
    ]


def _leftover_job(path: str) -> str:
    """The job a state leftover is of: a HOME is named <job>, a lease <uid>.<job>, a record
    <job>.json."""
    return os.path.basename(path).removesuffix(".json").rpartition(".")[2]


def assert_leased_uid(report: Report, daemon: Daemon) -> None:
    """The job ran as a uid leased from ``daemon``'s own block, and the gid of that number."""
    assert report.uid in daemon.job_uids, (report.uid, daemon.job_uids)
    assert report.gid == report.uid


#: Each daemon base directory gets a block of job uids of its own, from a range far from the
#: shipped default (systemd's DynamicUser range, 17 blocks of 250 only, which the suite's daemons
#: outnumber): daemons that run at the same time never lease the same uid, and a restart on the
#: same base (the same daemon, recovering its leases) keeps its block.
JOB_UIDS_FIRST, JOB_UIDS_LAST = 2_000_000, 2_999_999
JOB_UIDS_BLOCK = 250
_job_uid_blocks: dict[str, range] = {}


def job_uid_block(base: str) -> range:
    """The uids the daemon based at ``base`` leases to its jobs."""
    block = _job_uid_blocks.get(base)
    if block is None:
        first = JOB_UIDS_FIRST + len(_job_uid_blocks) * JOB_UIDS_BLOCK
        if first + JOB_UIDS_BLOCK - 1 > JOB_UIDS_LAST:
            raise RuntimeError(
                f"more daemon bases than blocks of {JOB_UIDS_BLOCK} uids in "
                f"{JOB_UIDS_FIRST}-{JOB_UIDS_LAST}: make JOB_UIDS_BLOCK smaller"
            )
        block = _job_uid_blocks[base] = range(first, first + JOB_UIDS_BLOCK)
    return block


def jail_table(base: str) -> str:
    """The config's ``[jail]`` table for the daemon based at ``base``: its own uid block."""
    return with_job_uids("", base)


def with_job_uids(config: str, base: str) -> str:
    """``config`` (TOML text) with the ``job_uids`` of the daemon based at ``base``: put first
    in the ``[jail]`` table it has, or in a ``[jail]`` table added at its end (after every
    top-level key, which a table header would otherwise claim)."""
    block = job_uid_block(base)
    line = f'job_uids = "{block.start}-{block.stop - 1}"\n'
    header = re.compile(r"^\[jail\][ \t]*(#.*)?\n", re.MULTILINE)
    if header.search(config):
        return header.sub(lambda m: m.group(0) + line, config, count=1)
    return f"{config}[jail]\n{line}"


#: The suite's daemon config: hosts-table entries whose addresses the proxy must refuse (not
#: named by the job, and loopback / the cloud metadata address).
TEST_CONFIG = """\
[hosts]
"metadata.example.test" = "169.254.169.254"
"loopback.example.test" = "127.0.0.1"
"""


#: A daemon without warm jails (``config_extra``), for tests that count every jail, record
#: and lease it has.
NO_POOL = "[jail]\npool_size = 0\n"


def start_daemon(base: str, *extra: str, config_extra: str = "") -> Daemon:
    """A netjaild with its socket, state and log under ``base``, once it is ready to serve."""
    daemon = launch_daemon(base, *extra, config_extra=config_extra)
    wait_until_ready(daemon)
    return daemon


def launch_daemon(
    base: str,
    *extra: str,
    config_extra: str = "",
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Daemon:
    """Start netjaild (``prefix`` runs before it, e.g. ``unshare --net --``) without waiting.

    Its config is ``config_extra`` (top-level keys first, then any tables), then TEST_CONFIG,
    with its own block of ``[jail] job_uids`` (``with_job_uids``): leave that key to this.
    Registered for the suite's leak check, and stopped at exit even if pytest dies first.
    """
    sock = os.path.join(base, "sock", "netjail.sock")
    state = os.path.join(base, "state")
    log_path = os.path.join(base, "netjaild.log")
    config = os.path.join(base, "netjaild.toml")
    with open(config, "w") as f:
        f.write(with_job_uids(config_extra + TEST_CONFIG, base))
    os.chmod(config, 0o644)
    offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed when the test ends
    process = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            *("-m", "netjail.daemon", "--config", config),
            *("--socket", sock, "--state-dir", state, *extra),
        ],
        stdout=log,
        stderr=log,
        env=env,
        pass_fds=pass_fds,
    )
    log.close()
    daemon = Daemon(sock, state, process, log_path, job_uid_block(base), log_offset=offset)
    STARTED.append(daemon)
    # If pytest itself dies (e.g. its output pipe closes), fixtures never finalise: stop it then.
    atexit.register(stop_daemon, daemon)
    return daemon


def wait_until_ready(daemon: Daemon, timeout: float = 30) -> None:
    """Until the daemon logged `ready` (recovery and self-test done), or fail with its log."""
    deadline = time.monotonic() + timeout
    while "netjaild ready" not in (daemon.log() if os.path.exists(daemon.log_path) else ""):
        if daemon.process.poll() is not None or time.monotonic() > deadline:
            daemon.process.kill()
            daemon.process.wait()
            note_stopped(daemon)
            raise RuntimeError(f"netjaild did not become ready:\n{daemon.log()}")
        time.sleep(0.02)


def stop_daemon(daemon: Daemon) -> None:
    """SIGTERM (SIGKILL after 15 s), then note what it left for the suite's leak check."""
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(15)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
    # Not once its base is gone (an exit handler after the suite): nothing is left to look at.
    if daemon.leftovers is None and os.path.isdir(os.path.dirname(daemon.state_dir)):
        note_stopped(daemon)


@pytest.fixture(scope="session")
def test_user() -> Iterator[pwd.struct_passwd]:
    """An unprivileged user in the netjail group (created for the suite, removed after)."""
    made_group = made_user = False
    try:
        grp.getgrnam(TEST_GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", TEST_GROUP], check=True)
        made_group = True
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "-G",
                TEST_GROUP,
                "-s",
                "/bin/sh",
                TEST_USER,
            ],
            check=True,
        )
        made_user = True
    yield pwd.getpwnam(TEST_USER)
    if made_user:
        subprocess.run(["userdel", TEST_USER], check=False)
    if made_group:
        subprocess.run(["groupdel", TEST_GROUP], check=False)


@pytest.fixture(scope="session")
def daemon_base() -> Iterator[str]:
    # Under /run, mode 0755, so an unprivileged test client can reach the socket.
    base = tempfile.mkdtemp(prefix="netjail-test-", dir="/run")
    os.chmod(base, 0o755)  # noqa: S103 - the unprivileged test client must reach the socket
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(test_user: pwd.struct_passwd, daemon_base: str) -> Iterator[Daemon]:
    """One real netjaild for the suite (tests that kill daemons start their own)."""
    d = start_daemon(daemon_base)
    yield d
    stop_daemon(d)
    assert d.process.returncode == 0, d.log()


@pytest.fixture(scope="session", autouse=True)
def no_leaks_after_suite() -> Iterator[None]:
    """After the whole suite: no jail netns, no job cgroup, no job process is left; and each
    daemon, once stopped, left no HOME (directory or mount) and no uid lease in its state."""
    yield
    time.sleep(0.2)
    ours = set().union(*(d.job_ids() for d in STARTED))
    # Every daemon runs a self-test job, so a run that started one has jobs to check.
    assert ours or not STARTED, "daemons ran but no job was seen: the check would prove nothing"
    assert {n.removeprefix("netjail-") for n in netjail_netns()} & ours == set()
    assert [c for c in netjail_job_cgroups() if os.path.basename(c) in ours] == []
    assert processes_of_jobs(ours) == []
    # A daemon killed on purpose leaves its state to the next one started on it, which
    # removes it (test_restart_after_a_crash_removes_every_leftover): the last one counts.
    last = {d.state_dir: d for d in STARTED}
    unchecked = [d.state_dir for d in last.values() if d.leftovers is None]
    assert unchecked == [], "stopped without note_stopped: their leftovers went unchecked"
    assert {state: d.leftovers for state, d in last.items() if d.leftovers} == {}
    assert [m for d in STARTED for m in home_mounts(d.state_dir)] == []
    # The last daemon on each state directory stopped cleanly, so it unmounted its tmpfs.
    assert state_mounts({d.state_dir for d in STARTED}) == []


NF_LOG_ALL_NETNS = "/proc/sys/net/netfilter/nf_log_all_netns"
#: The backend combinations the egress and policy suites run against.
BACKENDS = {
    "nftables-nflog": 'firewall = "nftables"\nlog_backend = "nflog"\n',
    "iptables-nflog": 'firewall = "iptables"\nlog_backend = "nflog"\n',
    "nftables-kmsg": 'firewall = "nftables"\nlog_backend = "kmsg"\n',
}


@pytest.fixture(scope="session", params=list(BACKENDS))
def backend_daemon(
    request: pytest.FixtureRequest, test_user: pwd.struct_passwd, daemon: Daemon
) -> Iterator[Daemon]:
    """A daemon per firewall/log backend (the default one is the suite's own daemon)."""
    if request.param == "nftables-nflog":
        yield daemon
        return
    with open(NF_LOG_ALL_NETNS) as f:
        saved = f.read().strip()  # the kmsg backend turns it on; put it back as it was
    base = tempfile.mkdtemp(prefix=f"netjail-test-{request.param}-", dir="/run")
    os.chmod(base, 0o755)  # noqa: S103 - as daemon_base
    d = start_daemon(base, config_extra=BACKENDS[request.param])
    try:
        yield d
    finally:
        stop_daemon(d)
        d.job_ids()  # read before the log goes with the directory
        with open(NF_LOG_ALL_NETNS, "w") as f:
            f.write(saved)
        shutil.rmtree(base, ignore_errors=True)
    assert d.process.returncode == 0, d.log()


@pytest.fixture
def client(daemon: Daemon) -> Client:
    return daemon.client()


@pytest.fixture
def no_leaks(client: Client) -> Iterator[None]:
    """After one test: its jobs are gone from the daemon and the kernel, and so are their
    HOMEs and uid leases (a job is unlisted only once its teardown is done)."""
    # Only the jobs started during the test: an earlier test's leak fails that test (and the
    # suite's check), not every test after it.
    before = set().union(*(d.job_ids() for d in STARTED))
    yield
    # Every live daemon's, not only the suite's: a test may run its jobs on a backend daemon,
    # and a job is unlisted only once its teardown (after its report) is done.
    live = [d.client() for d in STARTED if d.process.poll() is None]
    deadline = time.monotonic() + 10
    while any(c.ps() for c in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [job for c in live for job in c.ps()] == []
    ours = set().union(*(d.job_ids() for d in STARTED)) - before
    assert {n.removeprefix("netjail-") for n in netjail_netns()} & ours == set()
    assert [c for c in netjail_job_cgroups() if os.path.basename(c) in ours] == []
    [serving] = [d for d in STARTED if d.socket == client.socket and d.process.poll() is None]
    # HOMEs are named <job>, leases <uid>.<job>.
    left = state_leftovers(serving.state_dir)
    assert [p for p in left if _leftover_job(p) in ours] == []


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """HTTP and TLS upstreams in a test netns, for the policy tests of one module."""
    # Private to root: jobs see only the CA certificate, bound into them (Upstream.ca_bind).
    directory = tempfile.mkdtemp(prefix="netjail-up-", dir="/run")
    try:
        with upstream_servers(directory) as up:
            yield up
    finally:
        shutil.rmtree(directory, ignore_errors=True)
