#!/usr/bin/env bash
# `make bench`: every benchmark, one Markdown report on stdout and in target/bench-report.md.
# Benchmarks are not tests: they assert nothing about time and are not part of `make test`.
#
#   1. unary API overhead (benches/unary_api.rs): GetInstance / ListInstances against the
#      server on the in-memory store and on DynamoDB (moto), beside their floors (a bare
#      tonic Health/Check server; the SDK's GetItem / Query issued directly);
#   4. footprint (benches/footprint.rs): exec to SERVING, idle RSS, binary size;
#   backup/restore throughput and peak RSS (examples/backup_bench.rs) for BENCH_SIZES
#      (MiB of rows, default "50 400"), each size in its own process, against the local
#      MariaDB.
#
# Settings: BENCH_PROFILE=debug|release (default debug: a release build of everything takes
# long on a small machine; the ratios, not the absolute figures, are the point), BENCH_SECONDS
# (per unary cell, default 5), BENCH_SIZES. One private moto for the whole run.
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
build --features emulator --bench unary_api --bench footprint --example backup_bench
for exe in instance-manager unary_api footprint backup_bench; do
    [ -x "$work/$exe" ] || die "cargo built no $exe"
done

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

say "part 1: unary API overhead"
"$work/unary_api" --bench >>"$report"
echo >>"$report"

say "part 4: footprint"
"$work/footprint" --bench --binary "$work/instance-manager" >>"$report"
echo >>"$report"

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

cat "$report"
