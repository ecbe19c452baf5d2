#!/usr/bin/env bash
# `make bench`: every benchmark, one Markdown report on stdout and in target/bench-report.md.
# Benchmarks are not tests: they assert nothing about time and are not part of `make test`.
#
#   1. unary API overhead (benches/unary_api.rs): GetInstance / ListInstances against the
#      server on the in-memory store and on DynamoDB (moto), beside their floors (a bare
#      tonic Health/Check server; the SDK's GetItem / Query issued directly);
#   2. provisioning throughput (benches/provisioning.rs): BENCH_PROVISIONS (default 50)
#      concurrent CreateInstance through the real engine with workers BENCH_WORKERS (default
#      "10 50"), beside the sequential floor (BENCH_FLOOR provisionings, default 5); then
#      BENCH_WATCHED (default 10) more, each watched on the same server (event delivery on
#      the replica running the operation);
#   3. watch fan-out (benches/watch_fanout.rs): BENCH_WATCHERS (default 10000) WatchOperation
#      streams on one `instance-manager serve` while operations emit events
#      (BENCH_WATCH_OPS, BENCH_EVENT_MS, BENCH_WATCH_SECONDS), the server's default
#      `watch_poll_ms`; then once more with 100 watchers and `watch_poll_ms`
#      BENCH_SHORT_POLL_MS (default 50): the latency a shorter poll buys, and its reads;
#   4. footprint (benches/footprint.rs): exec to SERVING, idle RSS, binary size; with
#      BENCH_RELEASE_SIZE=1 also the release binary's size (a release build of the server
#      alone, whatever BENCH_PROFILE says: it takes long on a small machine, so it is opt-in);
#   backup/restore throughput and peak RSS (examples/backup_bench.rs) for BENCH_SIZES
#      (MiB of rows, default "50 400"), each size in its own process, against the local
#      MariaDB.
#
# Settings: BENCH_PROFILE=debug|release (default debug: a release build of everything takes
# long on a small machine; the ratios, not the absolute figures, are the point), BENCH_SECONDS
# (per unary cell, default 5), BENCH_SIZES, the knobs above, and BENCH_ONLY (a subset of
# "unary provisioning watch footprint backup", default all). One private moto for the whole
# run.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$IM_ROOT"

profile_name="${BENCH_PROFILE:-debug}"
case "$profile_name" in
    debug) profile=() ;;
    release) profile=(--release) ;;
    *) die "BENCH_PROFILE must be debug or release, not $profile_name" ;;
esac

bash scripts/ensure-venv.sh
bash scripts/mariadb.sh ensure
export MOTO_NAME="moto-bench-$$"
unset MOTO_PORT
work="$(mktemp -d)"
# shellcheck disable=SC2317  # invoked by trap
cleanup() {
    bash scripts/moto.sh stop || true
    rm -rf "$work"
}
trap cleanup EXIT
IM_TEST_AWS_ENDPOINT="$(bash scripts/moto.sh start)"
export IM_TEST_AWS_ENDPOINT
im_export_aws_test_env

# Prints the executables cargo built (JSON messages on stdin) as "name path" lines.
executables() {
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])
'
}

# Builds, then copies each executable to $work at once: a shared CARGO_TARGET_DIR may be
# rebuilt by another checkout while this runs.
build() {
    cargo build "${profile[@]}" --message-format=json-render-diagnostics "$@" | executables |
        while read -r name path; do cp "$path" "$work/$name"; done
}
say "building ($profile_name)"
# The server binary as it ships: no emulator feature.
build --bin instance-manager
build --features emulator --bench unary_api --bench footprint --bench provisioning \
    --bench watch_fanout --example backup_bench
for exe in instance-manager unary_api footprint provisioning watch_fanout backup_bench; do
    [ -x "$work/$exe" ] || die "cargo built no $exe"
done
# The release binary's size: only the server, without the emulator feature, as it ships.
release_size=""
if [ "${BENCH_RELEASE_SIZE:-0}" = 1 ]; then
    say "building the release binary (for its size)"
    started=$SECONDS
    cargo build --release --bin instance-manager --message-format=json-render-diagnostics |
        executables | while read -r name path; do cp "$path" "$work/$name.release"; done
    [ -x "$work/instance-manager.release" ] || die "cargo built no release instance-manager"
    bytes=$(stat -c %s "$work/instance-manager.release")
    strip -o "$work/instance-manager.release.stripped" "$work/instance-manager.release"
    stripped=$(stat -c %s "$work/instance-manager.release.stripped")
    release_size="$(awk -v b="$bytes" -v s="$stripped" -v t="$((SECONDS - started))" \
        'BEGIN { printf "release binary %.1f MiB, %.1f MiB stripped (release build of the server took %d s)", b / 1048576, s / 1048576, t }')"
fi

wanted() {
    case " ${BENCH_ONLY:-unary provisioning watch footprint backup} " in
        *" $1 "*) return 0 ;;
        *) return 1 ;;
    esac
}
# 10 000 streams take ~100 connections on each side; raise the soft limit anyway.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

mkdir -p target
report="$IM_ROOT/target/bench-report.md"
model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
memory="$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
{
    echo "# instance-manager benchmarks"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- machine: $(nproc) CPUs ($model), $memory memory"
    echo "- profile: $profile_name"
    echo "- Each figure sits beside its floor measured in the same run: the ratios are the point,"
    echo "  not the absolute figures (a debug build, and a machine that may be shared, move those)."
    echo
} >"$report"

if wanted unary; then
    say "part 1: unary API overhead"
    "$work/unary_api" --bench >>"$report"
    echo >>"$report"
fi

if wanted provisioning; then
    say "part 2: provisioning throughput"
    "$work/provisioning" --bench >>"$report"
    echo >>"$report"
fi

if wanted watch; then
    say "part 3: watch fan-out"
    "$work/watch_fanout" --bench --binary "$work/instance-manager" >>"$report"
    echo >>"$report"
    say "part 3, again: 100 watchers, watch_poll_ms ${BENCH_SHORT_POLL_MS:-50}"
    BENCH_WATCHERS=100 BENCH_WATCH_POLL_MS="${BENCH_SHORT_POLL_MS:-50}" \
        "$work/watch_fanout" --bench --binary "$work/instance-manager" >>"$report"
    echo >>"$report"
fi

if wanted footprint; then
    say "part 4: footprint"
    "$work/footprint" --bench --binary "$work/instance-manager" >>"$report"
    if [ -n "$release_size" ]; then
        printf -- '- %s\n' "$release_size" >>"$report"
    else
        echo "- release binary size: not measured (BENCH_RELEASE_SIZE=1 builds it)" >>"$report"
    fi
    echo >>"$report"
fi

if wanted backup; then
    say "backup and restore"
    {
        echo "## Backup and restore"
        echo
        echo "A generated database dumped to moto's S3 and restored into the local MariaDB, each size in its own process."
        echo
    } >>"$report"
    for mb in ${BENCH_SIZES:-50 400}; do
        printf -- '- %s\n' "$("$work/backup_bench" --mb "$mb")" >>"$report"
    done
fi

cat "$report"
