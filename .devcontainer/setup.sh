#!/usr/bin/env bash
# Set up the netjail dev container, once, when it is created (devcontainer.json's
# postCreateCommand), as root:
#
#   sudo bash .devcontainer/setup.sh [USER]
#
# 1. scripts/bootstrap: the Debian packages netjail needs (libnftables1, nftables, iproute2,
#    iptables, ...), a virtualenv in .venv from the system Python, and netjail in it (editable,
#    with the dev tools);
# 2. the netjail group, which may use netjaild's socket, with USER in it (default: the user
#    who ran sudo);
# 3. .venv handed to USER, so that pip install works without sudo;
# 4. /usr/local/bin/netjail and /usr/local/bin/netjaild, so that `netjail doctor` works in any
#    terminal.
#
# Idempotent: a rebuild or a second run changes nothing that is already in place.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root: sudo bash .devcontainer/setup.sh [USER]" >&2
    exit 1
fi
user=${1:-${SUDO_USER:-}}

bash scripts/bootstrap

# netjaild gives its socket to this group (the config's `group`, netjail by default); members
# may run jobs without sudo. A session sees a new group only from its next login: VS Code
# opens each terminal with a fresh `docker exec`, which reads /etc/group again, so new
# terminals have it.
if ! getent group netjail >/dev/null; then
    groupadd --system netjail
fi
if [ -n "$user" ] && [ "$user" != root ]; then
    usermod -aG netjail "$user"
    # bootstrap made .venv as root. The daemon runs from it as root, and a user-writable venv
    # would let that user change root's code; here that user has passwordless sudo anyway,
    # so this gives nothing away, and pip install works without sudo.
    chown -R "$user": .venv
fi

ln -sf "$PWD/.venv/bin/netjail" /usr/local/bin/netjail
ln -sf "$PWD/.venv/bin/netjaild" /usr/local/bin/netjaild

echo "setup: done; netjaild starts with the container (log: /var/log/netjaild.log)."
echo "setup: check the container with: netjail doctor"
