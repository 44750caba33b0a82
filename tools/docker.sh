#!/usr/bin/env bash
# Makes a Docker engine available for the test kit's container backend (`make test-containers`):
#   - installs Debian's `docker.io` (and `debootstrap`, for tools/images.sh) with apt-get when
#     root and missing, otherwise prints the exact command and fails;
#   - starts `dockerd` by hand when no daemon answers (no systemd on these machines), logging
#     to .tools/dockerd/dockerd.log; it keeps running after this script, like a service would.
# Idempotent: does nothing when `docker info` already answers.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
state="$root/.tools/dockerd"

say() { printf 'docker: %s\n' "$*"; }
fail() { printf 'docker: %s\n' "$*" >&2; exit 1; }

missing=()
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    # Unique names, in order.
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | awk '!seen[$0]++')
    if [ "$(id -u)" -eq 0 ]; then
        say "installing ${missing[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        fail "missing ${missing[*]}: run \`sudo apt-get install -y ${missing[*]}\` and try again"
    fi
fi

if docker info >/dev/null 2>&1; then
    exit 0
fi
[ "$(id -u)" -eq 0 ] || fail "no Docker daemon answers and only root can start one: run \`sudo dockerd\` (or start Docker your usual way) and try again"

mkdir -p "$state"
say "starting dockerd (log: .tools/dockerd/dockerd.log)"
# setsid: the daemon outlives this script and make's process group.
setsid dockerd >"$state/dockerd.log" 2>&1 < /dev/null &
echo $! >"$state/dockerd.pid"
for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && exit 0
    kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null || break
    sleep 0.5
done
tail -n 20 "$state/dockerd.log" >&2 || true
fail "dockerd did not answer within 30 s (log above)"
