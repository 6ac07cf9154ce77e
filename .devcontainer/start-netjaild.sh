#!/usr/bin/env bash
# Start netjaild in the background, each time the dev container starts (devcontainer.json's
# postStartCommand), as root:
#
#   sudo bash .devcontainer/start-netjaild.sh
#
# A container has no systemd to run the daemon, so it runs detached, its output appended to
# /var/log/netjaild.log (or $NETJAILD_LOG). Returns once the daemon answers on its socket, or
# fails with the end of the log, so that a daemon that cannot start shows up when the
# container starts rather than at the first `netjail run`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly LOG=${NETJAILD_LOG:-/var/log/netjaild.log}
readonly WAIT_S=20

if [ "$(id -u)" != 0 ]; then
    echo "start-netjaild: run as root: sudo bash .devcontainer/start-netjaild.sh" >&2
    exit 1
fi

# Run again by hand while a daemon answers: nothing to do. After a container restart no
# daemon runs, but its socket file may be left over; netjaild replaces a socket nobody
# answers on by itself.
if .venv/bin/netjail status >/dev/null 2>&1; then
    echo "start-netjaild: netjaild is already running"
    exit 0
fi

# setsid: out of the session and process group of the lifecycle command, which the dev
# container tooling may end (and signal) as soon as this script returns. All three standard
# streams are redirected, or the tooling would wait for the daemon to close them.
echo "--- $(date --iso-8601=seconds) starting netjaild" >>"$LOG"
setsid nohup .venv/bin/netjaild >>"$LOG" 2>&1 </dev/null &

for _ in $(seq $((WAIT_S * 10))); do
    if .venv/bin/netjail status >/dev/null 2>&1; then
        echo "start-netjaild: netjaild is running (log: $LOG)"
        exit 0
    fi
    sleep 0.1
done
echo "start-netjaild: netjaild did not start within ${WAIT_S}s; the end of $LOG:" >&2
tail -n 20 "$LOG" >&2
echo "start-netjaild: run 'netjail doctor' to see what is missing" >&2
exit 1
