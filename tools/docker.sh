#!/usr/bin/env bash
# Makes a Docker engine available for the test kit's container backend (`make test-containers`):
#   - nothing to do when `docker info` answers (any engine: Docker Desktop, a docker group...);
#   - installs Debian's `docker.io` with apt-get when root and missing, otherwise prints the
#     exact command and fails;
#   - starts `dockerd` by hand when no daemon answers (no systemd on these machines), with
#     published ports on 127.0.0.1 only (`--ip`: the test servers trust every client), logging
#     to .tools/dockerd/dockerd.log; it keeps running after this script, like a service would.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
state="$root/.tools/dockerd"

say() { printf 'docker: %s\n' "$*"; }
fail() { printf 'docker: %s\n' "$*" >&2; exit 1; }

# A daemon that answers (Docker Desktop, a docker group, rootless, DOCKER_HOST) is all we need.
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    exit 0
fi

if ! command -v docker >/dev/null 2>&1 || ! command -v dockerd >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        say "installing docker.io with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends docker.io >/dev/null
    else
        fail "no Docker: run \`sudo apt-get install -y docker.io\` (or install Docker your usual way) and try again"
    fi
fi

[ "$(id -u)" -eq 0 ] || fail "no Docker daemon answers and only root can start one: run \`sudo dockerd\` (or start Docker your usual way) and try again"

mkdir -p "$state"
say "starting dockerd (log: .tools/dockerd/dockerd.log)"
# setsid: the daemon outlives this script and make's process group.
setsid dockerd --ip=127.0.0.1 >"$state/dockerd.log" 2>&1 < /dev/null &
echo $! >"$state/dockerd.pid"
for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && exit 0
    kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null || break
    sleep 0.5
done
tail -n 20 "$state/dockerd.log" >&2 || true
fail "dockerd did not answer within 30 s (log above)"
