#!/usr/bin/env bash
# Installs buf project-locally (npm @bufbuild/buf into .tools/) and lints the API protos.
#
#   scripts/buf-lint.sh            install buf if missing, then lint
#   scripts/buf-lint.sh install    install buf if missing, nothing else
#
# The lint runs on the descriptor-set image that build.rs produces (with source info, so
# the COMMENTS rules see the comments), because buf cannot compile proto/ by itself:
# google/rpc/status.proto is resolved from tonic-types, not kept in the repository.
# `cargo test --test proto_lint` runs the same lint.
set -euo pipefail

BUF_VERSION=1.75.0
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
buf="$tools/node_modules/.bin/buf"

install_buf() {
    if [[ -x "$buf" ]] && [[ "$("$buf" --version 2>/dev/null)" == "$BUF_VERSION" ]]; then
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1; then
        echo "buf-lint: npm is required to install @bufbuild/buf (apt-get install npm)" >&2
        exit 1
    fi
    echo "buf-lint: installing @bufbuild/buf@$BUF_VERSION into .tools/" >&2
    mkdir -p "$tools"
    # --prefix keeps it out of the repository's own (absent) package.json; the binary comes
    # from the platform package (@bufbuild/buf-linux-x64, ...) that npm picks as an
    # optional dependency, so no download happens outside the registry.
    npm install --prefix "$tools" --no-audit --no-fund --loglevel=error \
        "@bufbuild/buf@$BUF_VERSION" >&2
    "$buf" --version >/dev/null
}

# Prints the OUT_DIR of this crate's build script, building the library if needed.
descriptor_set() {
    local out_dir
    out_dir="$(cd "$root" && cargo build --lib --message-format=json 2>/dev/null |
        grep '"reason":"build-script-executed"' |
        grep '#instance-manager@' |
        sed -n 's/.*"out_dir":"\([^"]*\)".*/\1/p' | tail -n 1)"
    if [[ -z "$out_dir" || ! -f "$out_dir/descriptor.bin" ]]; then
        echo "buf-lint: could not find the descriptor set; does 'cargo build' succeed?" >&2
        exit 1
    fi
    echo "$out_dir/descriptor.bin"
}

lint() {
    local image
    image="$(descriptor_set)"
    lint_dir="$(mktemp -d)"
    trap 'rm -rf "$lint_dir"' EXIT
    # buf picks the image format from the extension (or the #format= suffix).
    cp "$image" "$lint_dir/api.binpb"
    "$buf" lint "$lint_dir/api.binpb#format=binpb" --config "$root/proto/buf.yaml"
    echo "buf-lint: ok" >&2
}

case "${1:-lint}" in
    install) install_buf ;;
    lint) install_buf && lint ;;
    *)
        echo "usage: $0 [install|lint]" >&2
        exit 2
        ;;
esac
