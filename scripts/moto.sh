#!/usr/bin/env bash
# Local AWS emulator (moto server) for development and tests.
#
#   scripts/moto.sh start [PORT]   start moto on 127.0.0.1 (PORT, else $MOTO_PORT,
#                                  else a free port); print its endpoint URL.
#                                  If moto already answers on that port, reuse it.
#   scripts/moto.sh stop           stop the moto this script started (a reused
#                                  one is left running).
#   scripts/moto.sh endpoint       print the endpoint URL of the running instance.
#   scripts/moto.sh status         exit 0 if the instance answers.
#
# Several instances can coexist: $MOTO_NAME (default "moto") names the state
# files .run/$MOTO_NAME.{pid,port,log,reused}.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NAME="${MOTO_NAME:-moto}"
case "$NAME" in */* | "") die "bad MOTO_NAME '$NAME'" ;; esac
PIDF="$IM_RUN/$NAME.pid"
PORTF="$IM_RUN/$NAME.port"
REUSEDF="$IM_RUN/$NAME.reused"
LOG="$IM_RUN/$NAME.log"
HOST=127.0.0.1
READY_TRIES=300    # x 0.1 s = 30 s; moto usually answers within ~1 s
READY_INTERVAL=0.1

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# Does moto answer on this port? (moto's own API, not just any HTTP server)
moto_answers() {
    local url="http://$HOST:$1/moto-api/data.json"
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null
    else
        "$IM_VENV/bin/python" - "$url" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2).read()
PY
    fi
}

endpoint_of() { printf 'http://%s:%s\n' "$HOST" "$1"; }

recorded_port() { cat "$PORTF" 2>/dev/null || true; }

cmd_start() {
    local want_port="${1:-${MOTO_PORT:-}}"
    mkdir -p "$IM_RUN"
    [ -x "$IM_VENV/bin/moto_server" ] || die "$IM_VENV/bin/moto_server not found; run scripts/ensure-venv.sh first."

    # Already running under this name?
    local old_port old_pid
    old_port="$(recorded_port)"
    old_pid="$(cat "$PIDF" 2>/dev/null || true)"
    if [ -n "$old_port" ] && { [ -z "$want_port" ] || [ "$want_port" = "$old_port" ]; } \
        && { [ -f "$REUSEDF" ] || pid_alive "$old_pid"; } && moto_answers "$old_port"; then
        endpoint_of "$old_port"
        return 0
    fi
    # Stale state from a run that died: clean it up (only our own process).
    if pid_alive "$old_pid" && [ ! -f "$REUSEDF" ]; then kill "$old_pid" 2>/dev/null || true; fi
    rm -f "$PIDF" "$PORTF" "$REUSEDF"

    if [ -n "$want_port" ]; then
        case "$want_port" in *[!0-9]* ) die "bad port '$want_port'" ;; esac
        if port_open "$HOST" "$want_port"; then
            if moto_answers "$want_port"; then
                info "reusing the moto server already answering on $HOST:$want_port"
                printf '%s\n' "$want_port" >"$PORTF"
                : >"$REUSEDF"
                endpoint_of "$want_port"
                return 0
            fi
            die "port $HOST:$want_port is in use by something that is not moto. Stop it or pick another port (MOTO_PORT=...)."
        fi
        start_on "$want_port" || die "moto server did not start on $HOST:$want_port (log: $LOG)"
    else
        # A free port can be taken between picking and binding: retry a few times.
        local attempt port
        for attempt in 1 2 3; do
            port="$(free_port)"
            if start_on "$port"; then break; fi
            [ "$attempt" -lt 3 ] || die "moto server did not start (log: $LOG)"
            info "moto did not start on port $port; trying another"
        done
    fi
    endpoint_of "$(recorded_port)"
}

# Start moto_server on a port and wait until it answers. Returns 1 on failure
# (after showing its log).
start_on() {
    local port="$1" pid i
    info "starting moto server on $HOST:$port"
    # No job control here, so the background child ignores SIGINT: it is
    # stopped explicitly by 'stop' (callers trap EXIT).
    # moto_serial.py: moto answering one request at a time, so its DynamoDB transactions
    # are atomic under concurrency, as real DynamoDB's are (see that file).
    "$IM_VENV/bin/python" "$IM_ROOT/scripts/moto_serial.py" -H "$HOST" -p "$port" </dev/null >"$LOG" 2>&1 &
    pid=$!
    printf '%s\n' "$pid" >"$PIDF"
    printf '%s\n' "$port" >"$PORTF"
    for ((i = 0; i < READY_TRIES; i++)); do
        if moto_answers "$port"; then
            info "moto server ready at $(endpoint_of "$port") (pid $pid)"
            return 0
        fi
        if ! pid_alive "$pid"; then
            show_log_tail "$LOG"
            rm -f "$PIDF" "$PORTF"
            return 1
        fi
        sleep "$READY_INTERVAL"
    done
    warn "moto server (pid $pid) did not answer within $((READY_TRIES / 10)) s"
    show_log_tail "$LOG"
    kill "$pid" 2>/dev/null || true
    rm -f "$PIDF" "$PORTF"
    return 1
}

cmd_stop() {
    local pid i
    if [ -f "$REUSEDF" ]; then
        info "leaving the reused moto server on port $(recorded_port) running"
        rm -f "$PIDF" "$PORTF" "$REUSEDF"
        return 0
    fi
    pid="$(cat "$PIDF" 2>/dev/null || true)"
    if pid_alive "$pid"; then
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        if pid_alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        info "stopped moto server (pid $pid)"
    fi
    rm -f "$PIDF" "$PORTF" "$REUSEDF"
}

cmd_endpoint() {
    local port
    port="$(recorded_port)"
    [ -n "$port" ] || die "no moto server recorded under $IM_RUN/$NAME.*; run 'scripts/moto.sh start' first."
    endpoint_of "$port"
}

cmd_status() {
    local port
    port="$(recorded_port)"
    [ -n "$port" ] && moto_answers "$port"
}

case "${1:-}" in
    start) shift; [ $# -le 1 ] || usage; cmd_start "$@" ;;
    stop) cmd_stop ;;
    endpoint) cmd_endpoint ;;
    status) cmd_status ;;
    *) usage ;;
esac
