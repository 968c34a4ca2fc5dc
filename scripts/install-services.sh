#!/usr/bin/env bash
# Installs the servers that the scale-out tests start on 127.0.0.1 (redis-server, nginx), from
# the distribution's packages (Debian/Ubuntu apt), once. Tests start and stop their own
# instances on free ports; the packages' system services are not used.
# A machine without apt or root gets a message here, and those tests are skipped with
# the reason printed.
set -euo pipefail

PACKAGES=(redis-server nginx)
# nginx lives in /usr/sbin, which a non-root PATH may not hold
missing() {
    command -v redis-server >/dev/null 2>&1 || echo redis-server
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || echo nginx
}

[ -z "$(missing)" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-services: no apt-get; install ${PACKAGES[*]} yourself (the tests that need them are skipped)" >&2
    exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-services: not root and no sudo; install ${PACKAGES[*]} yourself (the tests that need them are skipped)" >&2
        exit 0
    fi
    SUDO=(sudo)
fi
# One apt at a time on this machine (two checkouts installing at once).
exec 9>"${TMPDIR:-/tmp}/deltaproxy-install-services.lock"
flock 9
[ -z "$(missing)" ] && exit 0
echo "installing ${PACKAGES[*]} from the distribution's packages (once)..." >&2
"${SUDO[@]}" apt-get update -qq >&2
# policy-rc.d-less containers: the package's service start may fail; the tests start their own.
# shellcheck disable=SC2046
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends $(missing) >&2
[ -z "$(missing)" ]
