#!/usr/bin/env bash
# `make bench`: backup/restore throughput and peak RSS for two database sizes
# (BENCH_SIZES, MiB of rows, default "50 400"), each size in its own process, against
# the local MariaDB and a private moto. The figures are from a debug build unless
# BENCH_PROFILE=release.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$IM_ROOT"

bash scripts/ensure-venv.sh
bash scripts/mariadb.sh ensure
export MOTO_NAME="moto-bench-$$"
unset MOTO_PORT
trap 'bash scripts/moto.sh stop || true' EXIT
IM_TEST_AWS_ENDPOINT="$(bash scripts/moto.sh start)"
export IM_TEST_AWS_ENDPOINT
im_export_aws_test_env

profile=()
if [ "${BENCH_PROFILE:-debug}" = release ]; then profile=(--release); fi
cargo build "${profile[@]}" --features emulator --example backup_bench
dir="${CARGO_TARGET_DIR:-target}/${BENCH_PROFILE:-debug}/examples"
for mb in ${BENCH_SIZES:-50 400}; do
    "$dir/backup_bench" --mb "$mb"
done
