#!/usr/bin/env bash
# `make dev`: run the service locally against emulators.
#
#   scripts/dev.sh              ensure venv + MariaDB, start moto on 127.0.0.1:4566
#                               (or $MOTO_PORT; an already running moto there is
#                               reused), build, bootstrap the table, then serve
#                               gRPC on $IM_LISTEN (default 127.0.0.1:50051)
#                               until Ctrl-C; stops the moto it started.
#   scripts/dev.sh bootstrap    the same up to the bootstrap, then exit, leaving
#                               moto running (stop it: MOTO_NAME=moto-dev
#                               scripts/moto.sh stop).
#
# Env: MOTO_PORT (4566), IM_TABLE (instance-manager), IM_LISTEN
# (127.0.0.1:50051); AWS_* default to moto's test values.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$IM_ROOT"

mode="${1:-serve}"
case "$mode" in serve | bootstrap) ;; *) die "usage: scripts/dev.sh [serve|bootstrap]" ;; esac

command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs) and re-run."

bash scripts/ensure-venv.sh
bash scripts/mariadb.sh ensure

export MOTO_NAME=moto-dev
moto_port="${MOTO_PORT:-4566}"
# Only stop moto at exit if this run started it (and, for `bootstrap`, only
# if bootstrapping failed: on success it is left running on purpose).
started_moto=1
if bash scripts/moto.sh status; then started_moto=0; fi
keep_moto=0
server_pid=""
# shellcheck disable=SC2317  # invoked by trap
cleanup() {
    if [ -n "$server_pid" ] && pid_alive "$server_pid"; then
        kill -TERM "$server_pid" 2>/dev/null || true
    fi
    if [ "$started_moto" = 1 ] && [ "$keep_moto" = 0 ]; then
        bash scripts/moto.sh stop || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

endpoint="$(bash scripts/moto.sh start "$moto_port")"

im_export_aws_test_env
export IM_AWS_ENDPOINT="$endpoint"
export IM_TABLE="${IM_TABLE:-instance-manager}"
export IM_LISTEN="${IM_LISTEN:-127.0.0.1:50051}"

# The `emulator` feature brings the emulated-platform bootstrap used below.
cargo build --features emulator
bin="${CARGO_TARGET_DIR:-$IM_ROOT/target}/debug/instance-manager"
[ -x "$bin" ] || die "$bin was not built"

# The table, then both environments' platforms (config/dev.toml) in the emulator, written
# out completed for `serve`.
dev_config="$IM_ROOT/.run/dev-config.toml"
mkdir -p "$IM_ROOT/.run"
"$bin" bootstrap --config "$IM_ROOT/config/dev.toml" --aws-endpoint "$IM_AWS_ENDPOINT" --table "$IM_TABLE" \
    --emulate-platform --mysql-host 127.0.0.1 --mysql-port 3306 --mysql-user root \
    --write-config "$dev_config" \
    || die "'instance-manager bootstrap' failed (moto at $IM_AWS_ENDPOINT, table $IM_TABLE)"

if [ "$mode" = bootstrap ]; then
    keep_moto=1
    say "bootstrapped table '$IM_TABLE' in moto at $IM_AWS_ENDPOINT (left running)"
    exit 0
fi

# The server runs in its own session so that a terminal's Ctrl-C reaches it
# exactly once, through the traps below (it treats a second signal as "exit
# now, skip draining").
run_detached=()
if command -v setsid >/dev/null 2>&1; then run_detached=(setsid); fi
# --no-auth: a local server for one developer, without tokens (it warns at start-up).
"${run_detached[@]}" "$bin" serve --no-auth --config "$dev_config" --listen "$IM_LISTEN" --aws-endpoint "$IM_AWS_ENDPOINT" --table "$IM_TABLE" &
server_pid=$!
# On Ctrl-C / TERM: pass the signal on, then wait for the server below.
trap 'kill -INT "$server_pid" 2>/dev/null || true' INT
trap 'kill -TERM "$server_pid" 2>/dev/null || true' TERM

listen_host="${IM_LISTEN%:*}"
listen_port="${IM_LISTEN##*:}"
for ((i = 0; i < 300; i++)); do
    pid_alive "$server_pid" || break
    if port_open "$listen_host" "$listen_port"; then
        say "instance-manager serving gRPC on $IM_LISTEN (AWS emulator: $IM_AWS_ENDPOINT, table: $IM_TABLE)"
        say "try: $IM_VENV/bin/grpcurl -plaintext $IM_LISTEN list    (Ctrl-C stops)"
        break
    fi
    sleep 0.1
done

rc=0
while :; do
    rc=0
    wait "$server_pid" || rc=$?
    # wait returns early (status > 128) when a trapped signal arrives.
    pid_alive "$server_pid" || break
done
server_pid=""
exit "$rc"
