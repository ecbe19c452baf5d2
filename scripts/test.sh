#!/usr/bin/env bash
# `make test`: the whole test suite against local emulators.
#
# Ensures the venv (moto, grpcurl, grpcio), MariaDB on 127.0.0.1:3306, helm and buf
# (if scripts/buf-lint.sh exists), starts ONE moto server on a free port for
# all test binaries, then runs unit, integration and doc tests with
# --no-fail-fast, and lints the Dockerfiles (hadolint). With arguments, runs
# just `cargo test --no-fail-fast ARGS` instead (e.g. `scripts/test.sh --test
# harness_smoke`). Exits with cargo's status (or hadolint's). Every run
# enables the `emulator` cargo feature (the emulated-platform bootstrap the
# integration tests use).
#
# Tests receive:
#   IM_TEST_AWS_ENDPOINT   http://127.0.0.1:PORT of the shared moto server
#   IM_TEST_GRPCURL        $ROOT/.venv/bin/grpcurl
#   IM_TEST_PYTHON         $ROOT/.venv/bin/python (grpcio, pymysql installed)
#   IM_TEST_MYSQL_URL      mysql://root@127.0.0.1:3306/test
#   IM_TEST_HELM           $ROOT/.tools/helm/helm (scripts/ensure-helm.sh)
#   AWS_REGION, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
#                          test values for moto (us-east-1, testing/testing)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$IM_ROOT"

if [ -n "${CI:-}" ]; then export CARGO_TERM_COLOR=never; fi

command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs) and re-run."

bash scripts/ensure-venv.sh
bash scripts/mariadb.sh ensure
IM_TEST_HELM="$(bash scripts/ensure-helm.sh)"
export IM_TEST_HELM
if [ -f scripts/buf-lint.sh ]; then
    bash scripts/buf-lint.sh install
fi

# One moto for the whole run, on a free port, private to this invocation.
export MOTO_NAME="moto-test-$$"
unset MOTO_PORT
rc=1
# shellcheck disable=SC2317  # invoked by trap
stop_moto() {
    bash scripts/moto.sh stop || true
    # Keep moto's log only when something failed.
    if [ "$rc" -eq 0 ]; then rm -f "$IM_RUN/$MOTO_NAME.log"; fi
}
trap stop_moto EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
IM_TEST_AWS_ENDPOINT="$(bash scripts/moto.sh start)"
export IM_TEST_AWS_ENDPOINT
export IM_TEST_GRPCURL="$IM_VENV/bin/grpcurl"
export IM_TEST_PYTHON="$IM_VENV/bin/python"
export IM_TEST_MYSQL_URL="${IM_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/test}"
im_export_aws_test_env
info "moto at $IM_TEST_AWS_ENDPOINT"

# The emulated platform (cloud::platform, `bootstrap --emulate-platform`) is
# test and `make dev` machinery, compiled only with this feature.
features=(--features emulator)

rc=0
if [ $# -gt 0 ]; then
    # A selection from the caller: one cargo test run with it.
    cargo test "${features[@]}" --no-fail-fast "$@" || rc=$?
else
    # Unit tests (lib, bin), integration tests, and the examples built. Not the benches
    # (`--all-targets` would build and run them): they are `make bench`'s, and clippy checks them.
    cargo test "${features[@]}" --lib --bins --tests --examples --no-fail-fast || rc=$?
    # Doc tests (not part of the above); only a library has them.
    if [ -f src/lib.rs ]; then
        doc_rc=0
        cargo test "${features[@]}" --doc --no-fail-fast || doc_rc=$?
        if [ "$rc" -eq 0 ]; then rc="$doc_rc"; fi
    fi
    # The Dockerfiles' lint (hadolint from the venv; well under a second). The image itself
    # is tested by `make image-test`.
    lint_rc=0
    "$IM_VENV/bin/hadolint" --no-color Dockerfile docker/*/Dockerfile || lint_rc=$?
    if [ "$lint_rc" -ne 0 ]; then
        say "hadolint found problems in the Dockerfiles"
        if [ "$rc" -eq 0 ]; then rc="$lint_rc"; fi
    fi
fi
if [ "$rc" -ne 0 ]; then
    say "cargo test failed (exit $rc)"
fi
exit "$rc"
