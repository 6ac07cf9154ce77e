"""A finished job's report, assembled from what the pipeline collected (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from netjail.daemon.intake import JobFeed
from netjail.daemon.spec import JobSpec
from netjail.kernel.cgroup import ResourceUsage
from netjail.kernel.jobplan import JobExit
from netjail.kernel.seccomp import PROFILE as SECCOMP_PROFILE
from netjail.kernel.spawn import ExitStatus
from netjail.protocol import Report


@dataclass
class Capture:
    """One captured stream (stdout or stderr): at most ``limit`` bytes kept, the rest counted
    as truncation."""

    fd: int
    limit: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    closed: bool = False

    def take(self, chunk: bytes) -> None:
        """Keep what fits of ``chunk``; remember that something did not."""
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
        if room > 0:
            self.data += chunk[:room]


@dataclass(frozen=True)
class Ending:
    """How the job ended, as the supervisor saw it."""

    #: The command's end; with the init's rusage (ExitStatus) when the cgroup's figures could
    #: not be read.
    status: ExitStatus | JobExit
    #: The cgroup's figures; None when the host could not give them.
    usage: ResourceUsage | None
    wall_s: float
    timed_out: bool


def build_report(
    job_id: str,
    spec: JobSpec,
    *,
    user: tuple[int, int],
    feed: JobFeed,
    ending: Ending,
    captures: tuple[Capture, ...],
) -> Report:
    """The report a job's client gets: exit, resources, events, domains, captured output.

    ``user`` is the (uid, gid) the job ran as: its leased uid, or the fixed one.
    """
    status, usage = ending.status, ending.usage
    rusage = status if isinstance(status, ExitStatus) else None
    report = Report(
        job=job_id,
        argv=spec.argv,
        uid=user[0],
        gid=user[1],
        exit_code=status.exit_code,
        signal=status.signal,
        wall_s=round(ending.wall_s, 6),
        events=feed.events.events,
        lost_events=feed.lost,
        timed_out=ending.timed_out,
        oom_killed=bool(usage and usage.oom_killed),
        cpu_user_s=usage.cpu_user_s if usage else rusage.cpu_user_s if rusage else None,
        cpu_system_s=usage.cpu_system_s if usage else rusage.cpu_system_s if rusage else None,
        memory_peak_bytes=usage.memory_peak_bytes if usage else None,
        pids_peak=usage.pids_peak if usage else None,
        limits=spec.limits,
        domains=dict(feed.domains),
        events_not_kept=dict(feed.events.not_kept),
        seccomp_profile=SECCOMP_PROFILE,
    )
    if len(captures) == 2:
        out, err = captures
        report.stdout, report.stdout_truncated = bytes(out.data), out.truncated
        report.stderr, report.stderr_truncated = bytes(err.data), err.truncated
    return report
