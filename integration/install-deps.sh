#!/usr/bin/env bash
# Installs what the integration suite needs, non-interactively, as root:
# Postfix (with debconf "No configuration", so no system instance is set up),
# swaks, redis-server, prometheus (for promtool), dnsmasq (a real DNS server for the
# MX rollup test), python3 and pytest.
#
# Idempotent and fast when everything is present: apt-get update runs only
# when a package is actually missing.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: must run as root (Postfix and apt-get need it)" >&2
    exit 1
fi

# command -> Debian package that provides it
declare -A NEED=(
    [/usr/sbin/postfix]=postfix
    [/usr/sbin/smtp-source]=postfix
    [/usr/bin/swaks]=swaks
    [/usr/bin/redis-server]=redis-server
    [/usr/sbin/dnsmasq]=dnsmasq-base
    [/usr/bin/promtool]=prometheus
    [/usr/bin/python3]=python3
)

missing=()
for cmd in "${!NEED[@]}"; do
    if [ ! -x "$cmd" ]; then
        missing+=("${NEED[$cmd]}")
    fi
done

# pytest goes where the `python3` on PATH can import it. Debian's own
# interpreter gets the Debian package (pip is blocked there by PEP 668);
# any other interpreter (pyenv, venv) gets it from PyPI with its own pip.
py="$(command -v python3 || true)"
pytest_via_pip=0
if [ -z "$py" ] || ! "$py" -c 'import pytest' 2>/dev/null; then
    if [ -z "$py" ] || [ "$(readlink -f "$py")" = "$(readlink -f /usr/bin/python3 2>/dev/null || echo none)" ]; then
        missing+=(python3-pytest)
    else
        pytest_via_pip=1
    fi
fi

if [ "${#missing[@]}" -gt 0 ]; then
    # Deduplicate (postfix is listed twice).
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "install-deps.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    # Package scripts must not start system services (redis, prometheus,
    # postfix) on a machine without an init system meant for them.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    trap 'if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$pytest_via_pip" = 1 ]; then
    echo "install-deps.sh: installing pytest with $py -m pip"
    "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore pytest
fi

# Final check: fail loudly rather than let the tests discover it.
for cmd in "${!NEED[@]}"; do
    [ -x "$cmd" ] || { echo "install-deps.sh: $cmd still missing" >&2; exit 1; }
done
python3 -c 'import pytest' || { echo "install-deps.sh: pytest not importable by $(command -v python3)" >&2; exit 1; }
id postfix >/dev/null || { echo "install-deps.sh: user postfix missing" >&2; exit 1; }
getent group postdrop >/dev/null || { echo "install-deps.sh: group postdrop missing" >&2; exit 1; }
echo "install-deps.sh: all dependencies present"
