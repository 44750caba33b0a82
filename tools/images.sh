#!/usr/bin/env bash
# Builds, once, the two local images the container backend runs when no registry can be
# reached (these machines cannot pull), and tags them:
#   outbox-toolkit/postgres:15-bookworm  Debian 12's postgresql-15 on a debootstrap minbase root,
#                                        with the official image's interface: port 5432, user
#                                        postgres, POSTGRES_HOST_AUTH_METHOD, CMD ["postgres"],
#                                        data in /var/lib/postgresql/data
#   outbox-toolkit/nats:2.15.1           the pinned nats-server 2.15.1 (.tools/bin, from
#                                        tools/install.sh) on a debootstrap minbase root, with
#                                        the official image's interface: ENTRYPOINT
#                                        ["/nats-server"], ports 4222/6222/8222
# Needs root (debootstrap, chroot), Docker (tools/docker.sh) and Debian's package mirror
# (DEBIAN_MIRROR, default http://deb.debian.org/debian). Idempotent: an image that exists is
# kept; `docker rmi` it to rebuild. Takes about 2 minutes on 2 cores.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
nats_version=2.15.1
pg_image=outbox-toolkit/postgres:15-bookworm
nats_image=outbox-toolkit/nats:$nats_version
cache="$root/.tools/debootstrap-cache"

say() { printf 'images: %s\n' "$*"; }
fail() { printf 'images: %s\n' "$*" >&2; exit 1; }

have() { docker image inspect "$1" >/dev/null 2>&1; }

# Images named otherwise (TESTKIT_POSTGRES_IMAGE / TESTKIT_NATS_IMAGE, pulled by Docker) are
# not built here.
want_pg=$([ "${TESTKIT_POSTGRES_IMAGE:-$pg_image}" = "$pg_image" ] && ! have "$pg_image" && echo 1 || true)
want_nats=$([ "${TESTKIT_NATS_IMAGE:-$nats_image}" = "$nats_image" ] && ! have "$nats_image" && echo 1 || true)
if [ -z "$want_pg" ] && [ -z "$want_nats" ]; then
    exit 0
fi
[ "$(id -u)" -eq 0 ] || fail "building the local images needs root (debootstrap): run \`sudo make test-containers\`, or set TESTKIT_POSTGRES_IMAGE / TESTKIT_NATS_IMAGE to images you can pull"
if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$cache"

# $1: target dir, rest: extra packages
minbase() {
    local dir=$1
    shift
    local include=()
    [ $# -gt 0 ] && include=("--include=$(IFS=,; echo "$*")")
    debootstrap --variant=minbase --cache-dir="$cache" "${include[@]}" "$suite" "$dir" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log" >&2; fail "debootstrap failed (log above)"; }
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* \
        "$dir"/usr/share/man/* "$dir"/usr/share/locale/*
}

if [ -n "$want_pg" ]; then
    say "building $pg_image (debootstrap $suite minbase + postgresql-15)"
    rootfs="$work/postgres"
    minbase "$rootfs" postgresql-15
    # The package's own cluster is not used: the entrypoint makes one in $PGDATA.
    rm -rf "$rootfs/var/lib/postgresql/15" "$rootfs/etc/postgresql/15"
    install -d "$rootfs/var/lib/postgresql/data"
    chroot "$rootfs" chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
    cat >"$rootfs/usr/local/bin/docker-entrypoint.sh" <<'SH'
#!/bin/sh
# The official postgres image's interface, for tests: a cluster made in $PGDATA on first
# start (superuser postgres, POSTGRES_HOST_AUTH_METHOD for TCP clients, default trust),
# listening on all addresses; then the command ("postgres" plus its flags).
set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    initdb -D "$PGDATA" --username=postgres --auth-local=trust \
        --auth-host="${POSTGRES_HOST_AUTH_METHOD:-trust}" --encoding=UTF8 --locale=C >/dev/null
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    echo "host all all all ${POSTGRES_HOST_AUTH_METHOD:-trust}" >>"$PGDATA/pg_hba.conf"
fi
exec "$@"
SH
    chmod 755 "$rootfs/usr/local/bin/docker-entrypoint.sh"
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV PGDATA=/var/lib/postgresql/data' \
        -c 'USER postgres' \
        -c 'EXPOSE 5432' \
        -c 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
        -c 'CMD ["postgres"]' \
        - "$pg_image" >/dev/null
fi

if [ -n "$want_nats" ]; then
    nats="$root/.tools/bin/nats-server"
    "$nats" --version 2>/dev/null | grep -q "v$nats_version" \
        || fail "nats-server $nats_version is not in .tools/bin: run \`make tools\` first"
    say "building $nats_image (debootstrap $suite minbase + nats-server $nats_version)"
    rootfs="$work/nats"
    minbase "$rootfs"
    install -m 755 "$nats" "$rootfs/nats-server"
    tar -C "$rootfs" -c . | docker import \
        -c 'EXPOSE 4222 6222 8222' \
        -c 'ENTRYPOINT ["/nats-server"]' \
        -c 'CMD ["--jetstream"]' \
        - "$nats_image" >/dev/null
fi
say "built the local images"
