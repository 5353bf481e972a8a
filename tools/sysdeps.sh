#!/usr/bin/env bash
# Debian packages the tests need, installed when missing (make test and .ci/run call this):
# the console's browser tests (tests/ui) drive Debian's chromium through Playwright
# (Playwright's own browser downloads are not used), and tests/deploy checks the systemd
# units with systemd-analyze.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing ${need[*]} (Debian packages the tests need)" >&2
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
