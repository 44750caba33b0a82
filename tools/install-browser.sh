#!/usr/bin/env bash
# Installs what the browser tests need when it is missing: Debian's chromium and
# chromium-driver (a browser that downloads its own build cannot work on these machines).
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    echo "tools: installing chromium and chromium-driver (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; }
else
    echo "tools: the browser tests need chromium and chromium-driver; run:" >&2
    echo "  sudo apt-get install -y chromium chromium-driver" >&2
    exit 1
fi
