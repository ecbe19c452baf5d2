#!/usr/bin/env bash
# `make image-test`: builds the Dockerfile's runtime stage on a local Debian base with the
# binary built here, runs it as the production image runs (read-only root file system,
# non-root user) against moto and the local MariaDB, and checks it end to end.
#
# No registry image can be pulled and there is no Docker engine on the project's machines:
# podman (runc) builds and runs the image, and mmdebstrap makes the base from Debian's
# packages (TESTING.md, "Container images without a Docker engine"). The builder stage is
# not built here: the runtime stage takes the binary from the build context
# (BINARY_SOURCE=local), and that binary is a debug build (a release build would compile
# every dependency again in another profile). The runtime stage's instructions are the
# ones a production build runs.
#
# Checks: the image's HEALTHCHECK and an external client (grpcurl) see grpc.health.v1
# SERVING; the process runs as uid 10001; the root file system refuses writes and /tmp
# (TMPDIR) takes them; the dump programs backups need are there; logs are JSON lines
# without colour; CreateInstance through the container reaches ACTIVE, and DeleteInstance
# (which also removes the tenant's database from the shared MariaDB) DEPROVISIONED.
#
# Env:
#   IM_BINARY            binary for the image (default: `cargo build --bin instance-manager`,
#                        no features, as production builds it)
#   IM_BOOTSTRAP_BINARY  binary that bootstraps the emulated platform (default: `cargo build
#                        --features emulator --bin instance-manager`)
#   IM_IMAGE_FRESH_BASE  1: build the Debian base again even if localhost/$BASE_IMAGE exists
#   IM_IMAGE_KEEP        1: keep the test image and the work directory (.run/image-test)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$IM_ROOT"

BASE_IMAGE=localhost/instance-manager-test-base:bookworm
IMAGE=localhost/instance-manager:image-test
CONTAINER="im-image-test-$$"
TABLE="im-image-test-$$"
# Bounds on waits (each one polls a condition; nothing here is timed by sleeping).
SERVING_DEADLINE_SECS=90
OPERATION_DEADLINE_SECS=300
# What this machine lets containers do (TESTING.md): runc, lowered limits, the host network.
RUN_LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f s", b - a }'; }

# ---- tools -------------------------------------------------------------------------------
missing=()
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_get=()
    if [ "$(id -u)" = 0 ]; then
        apt_get=(apt-get)
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        apt_get=(sudo apt-get)
    fi
    command -v apt-get >/dev/null 2>&1 || apt_get=()
    [ "${#apt_get[@]}" -gt 0 ] ||
        die "needs ${missing[*]}: install them (Debian/Ubuntu: 'sudo apt-get install podman runc mmdebstrap uidmap') and re-run"
    say "installing ${missing[*]} with apt-get"
    "${apt_get[@]}" update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq --no-install-recommends \
        podman runc mmdebstrap uidmap >/dev/null ||
        die "apt-get could not install podman runc mmdebstrap uidmap; install them and re-run"
fi
command -v cargo >/dev/null 2>&1 || [ -n "${IM_BINARY:-}" ] ||
    die "cargo not found; install Rust (https://rustup.rs) or set IM_BINARY"

bash scripts/ensure-venv.sh
bash scripts/mariadb.sh ensure

work="$IM_RUN/image-test"
rm -rf "$work"
mkdir -p "$work/context"

# ---- state for the summary and for cleaning up -----------------------------------------
results=()
failures=0
pass() { results+=("PASS  $*"); }
fail() { results+=("FAIL  $*"); failures=$((failures + 1)); }
timings=()
container_started=0
started=0
# shellcheck disable=SC2317  # invoked by trap
print_summary() {
    local line
    echo "image-test summary ($IMAGE on $BASE_IMAGE):"
    for line in "${timings[@]}"; do echo "  time  $line"; done
    for line in "${results[@]}"; do echo "  $line"; done
    if [ "$1" -eq 0 ] && [ "$failures" -eq 0 ]; then
        echo "image-test: PASS (${#results[@]} checks)"
    else
        echo "image-test: FAIL ($failures of ${#results[@]} checks failed; logs in $work)"
    fi
}
# shellcheck disable=SC2317  # invoked by trap
cleanup() {
    local rc=$?
    print_summary "$rc" >&2
    if [ "$container_started" = 1 ]; then
        if [ "$rc" -ne 0 ] || [ "$failures" -ne 0 ]; then
            podman logs "$CONTAINER" >"$work/container.log" 2>&1 || true
            show_log_tail "$work/container.log" 30
        fi
        podman rm -f "$CONTAINER" >/dev/null 2>&1 || true
    fi
    if [ "$started" = 1 ]; then
        bash scripts/moto.sh stop || true
        # moto's log is kept only when something failed.
        if [ "$rc" -eq 0 ] && [ "$failures" -eq 0 ]; then rm -f "$IM_RUN/$MOTO_NAME.log"; fi
    fi
    if [ "${IM_IMAGE_KEEP:-}" != 1 ]; then
        podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
        if [ -n "${dangling_before+set}" ]; then
            comm -13 <(printf '%s\n' "$dangling_before") \
                <(podman images --quiet --filter dangling=true | sort) |
                xargs -r podman rmi -f >/dev/null 2>&1 || true
        fi
        if [ "$rc" -eq 0 ] && [ "$failures" -eq 0 ]; then rm -rf "$work"; fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- binaries ----------------------------------------------------------------------------
# The target directory may be shared with other checkouts (CARGO_TARGET_DIR): the moment
# cargo releases it, another checkout's build can replace target/debug/instance-manager. So
# each binary is copied away and the copy checked: its debug info names the directory it
# was compiled in (this checkout), and it has (or lacks) the emulator feature as asked.
target_dir="${CARGO_TARGET_DIR:-$IM_ROOT/target}"
compiled_here() {
    "$IM_VENV/bin/python" - "$1" "$IM_ROOT" <<'PY'
import mmap, sys
with open(sys.argv[1], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    sys.exit(0 if m.find(sys.argv[2].encode() + b"\0") >= 0 else 1)
PY
}
has_emulator() { "$1" bootstrap --help 2>/dev/null | grep -q -- --mysql-host; }
# build_copy DEST emulator|plain
build_copy() {
    local dest="$1" kind="$2" features=() try
    if [ "$kind" = emulator ]; then features=(--features emulator); fi
    for try in 1 2 3; do
        # Checkouts of the same crate share artifact names in a shared target directory, and
        # cargo may take another checkout's build for fresh: touched, the crate is rebuilt
        # from this one's sources.
        if [ "$target_dir" != "$IM_ROOT/target" ]; then touch src/lib.rs src/main.rs; fi
        cargo build --quiet "${features[@]}" --bin instance-manager
        cp "$target_dir/debug/instance-manager" "$dest"
        if compiled_here "$dest" && { if [ "$kind" = emulator ]; then has_emulator "$dest"; else ! has_emulator "$dest"; fi; }; then
            return 0
        fi
        say "another build replaced $target_dir/debug/instance-manager before it was copied (try $try)"
    done
    die "could not copy this checkout's $kind binary out of $target_dir; set IM_BINARY / IM_BOOTSTRAP_BINARY"
}
if [ -n "${IM_BOOTSTRAP_BINARY:-}" ]; then
    cp "$IM_BOOTSTRAP_BINARY" "$work/bootstrap"
else
    build_copy "$work/bootstrap" emulator
fi
if [ -n "${IM_BINARY:-}" ]; then
    cp "$IM_BINARY" "$work/context/instance-manager"
else
    build_copy "$work/context/instance-manager" plain
fi
binary="$work/context/instance-manager"
"$binary" healthcheck --help >/dev/null 2>&1 ||
    die "$binary has no 'healthcheck' subcommand (built from another checkout?)"

# ---- base image ------------------------------------------------------------------------
t0="$(now)"
if [ "${IM_IMAGE_FRESH_BASE:-}" = 1 ] || ! podman image exists "$BASE_IMAGE"; then
    say "building the Debian bookworm base with mmdebstrap (about a minute)"
    mmdebstrap --quiet --variant=minbase --include=ca-certificates,mariadb-client \
        bookworm "$work/base.tar" >"$work/mmdebstrap.log" 2>&1 || {
        show_log_tail "$work/mmdebstrap.log"
        die "mmdebstrap failed (it needs Debian's mirrors)"
    }
    previous_base="$(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)"
    podman import --quiet "$work/base.tar" "$BASE_IMAGE" >/dev/null
    if [ -n "$previous_base" ]; then podman rmi "$previous_base" >/dev/null 2>&1 || true; fi
    rm -f "$work/base.tar"
    timings+=("base image (mmdebstrap + import): $(elapsed "$t0" "$(now)")")
else
    timings+=("base image: reused $BASE_IMAGE (IM_IMAGE_FRESH_BASE=1 rebuilds it)")
fi

# ---- the runtime stage -----------------------------------------------------------------
# --format docker: the OCI format has no HEALTHCHECK. The context is just the binary.
t0="$(now)"
# The binary-local stage stays behind as an untagged image: whatever untagged images the
# build adds are removed at the end.
dangling_before="$(podman images --quiet --filter dangling=true | sort)"
podman build --quiet --format docker --network host "${RUN_LIMITS[@]}" \
    --file "$IM_ROOT/Dockerfile" --target runtime \
    --build-arg RUNTIME_IMAGE="$BASE_IMAGE" \
    --build-arg BINARY_SOURCE=local --build-arg BINARY=instance-manager \
    --tag "$IMAGE" "$work/context" >"$work/build.log" 2>&1 || {
    show_log_tail "$work/build.log"
    die "podman build failed"
}
size="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
timings+=("runtime stage build: $(elapsed "$t0" "$(now)"), image $((size / 1000000)) MB")
config_user="$(podman image inspect --format '{{.Config.User}}' "$IMAGE")"
if [ "$config_user" = 10001:10001 ]; then
    pass "image: USER is $config_user"
else
    fail "image: USER is '$config_user', expected 10001:10001"
fi
healthcheck="$(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")"
if [[ "$healthcheck" == *'"instance-manager","healthcheck"'* ]]; then
    pass "image: HEALTHCHECK runs 'instance-manager healthcheck'"
else
    fail "image: HEALTHCHECK is $healthcheck"
fi

# ---- emulator and platform ---------------------------------------------------------------
export MOTO_NAME="moto-image-test-$$"
unset MOTO_PORT
endpoint="$(bash scripts/moto.sh start)"
started=1
im_export_aws_test_env
config="$work/config.toml"
"$work/bootstrap" bootstrap --config "$IM_ROOT/config/dev.toml" --aws-endpoint "$endpoint" \
    --table "$TABLE" --emulate-platform --mysql-host 127.0.0.1 --mysql-port 3306 \
    --mysql-user root --write-config "$config" >"$work/bootstrap.log" 2>&1 || {
    show_log_tail "$work/bootstrap.log"
    die "bootstrap failed (moto at $endpoint)"
}
# The container's user reads it; it holds only emulator settings.
chmod 0644 "$config"

# ---- run it as production does ---------------------------------------------------------
port="$(free_port)"
server="http://127.0.0.1:$port"
t_run="$(now)"
podman run --detach --name "$CONTAINER" --runtime runc "${RUN_LIMITS[@]}" --network host \
    --read-only --tmpfs /tmp --user 10001:10001 \
    --volume "$config:/etc/instance-manager/config.toml:ro" \
    --env IM_LISTEN="127.0.0.1:$port" --env IM_SERVER="$server" \
    --env IM_AWS_ENDPOINT="$endpoint" --env IM_TABLE="$TABLE" \
    --env AWS_REGION --env AWS_DEFAULT_REGION --env AWS_ACCESS_KEY_ID \
    --env AWS_SECRET_ACCESS_KEY --env AWS_EC2_METADATA_DISABLED \
    "$IMAGE" serve --no-auth --config /etc/instance-manager/config.toml \
    >"$work/run.log" 2>&1 || {
    cat "$work/run.log" >&2
    die "podman run failed"
}
container_started=1

running() { [ "$(podman inspect --format '{{.State.Running}}' "$CONTAINER" 2>/dev/null)" = true ]; }
# podman runs the image's HEALTHCHECK command in the container (exit 0: healthy). Without
# systemd podman cannot schedule it, so it is run on demand.
deadline=$(($(date +%s) + SERVING_DEADLINE_SECS))
healthy=0
while [ "$(date +%s)" -lt "$deadline" ] && running; do
    if podman healthcheck run "$CONTAINER" >/dev/null 2>&1; then
        healthy=1
        break
    fi
    sleep 0.5
done
if [ "$healthy" = 1 ]; then
    pass "HEALTHCHECK (instance-manager healthcheck in the container): healthy"
    timings+=("podman run to SERVING: $(elapsed "$t_run" "$(now)")")
else
    fail "HEALTHCHECK not healthy within ${SERVING_DEADLINE_SECS}s (running: $(running && echo yes || echo no))"
    exit 1
fi
health_json="$("$IM_VENV/bin/grpcurl" -plaintext -d '{}' "127.0.0.1:$port" grpc.health.v1.Health/Check 2>&1 || true)"
if [[ "$health_json" == *'"status": "SERVING"'* ]]; then
    pass "grpc.health.v1 Check from the host (grpcurl): SERVING"
else
    fail "grpc.health.v1 Check from the host (grpcurl): $health_json"
fi

# ---- user, file system, tools, logs ------------------------------------------------------
uid="$(podman exec "$CONTAINER" id -u 2>&1 || true)"
gid="$(podman exec "$CONTAINER" id -g 2>&1 || true)"
if [ "$uid:$gid" = 10001:10001 ]; then
    pass "process user: uid $uid gid $gid"
else
    fail "process user: uid '$uid' gid '$gid', expected 10001:10001"
fi
server_uid="$(podman exec "$CONTAINER" sh -c 'stat -c %u /proc/1' 2>&1 || true)"
if [ "$server_uid" = 10001 ]; then
    pass "the server (pid 1) runs as uid 10001"
else
    fail "the server (pid 1) runs as uid '$server_uid'"
fi
if write_error="$(podman exec "$CONTAINER" sh -c 'echo x > /usr/local/bin/probe' 2>&1)"; then
    fail "root file system: a write to /usr/local/bin succeeded"
elif [[ "$write_error" == *"Read-only file system"* ]]; then
    pass "root file system: read-only ($write_error)"
else
    fail "root file system: write refused, but not as read-only: $write_error"
fi
if podman exec "$CONTAINER" sh -c 'f="$(mktemp)" && echo x > "$f" && rm "$f"' >/dev/null 2>&1; then
    pass "TMPDIR (/tmp): writable"
else
    fail "TMPDIR (/tmp): not writable"
fi
if tools="$(podman exec "$CONTAINER" sh -c 'mariadb-dump --version && mariadb --version' 2>&1)"; then
    pass "dump programs run: $(printf '%s' "$tools" | head -n 1)"
else
    fail "dump programs: $tools"
fi
first_log="$(podman logs "$CONTAINER" 2>&1 | head -n 1)"
if printf '%s' "$first_log" | "$IM_VENV/bin/python" -c 'import json, sys
line = sys.stdin.read()
assert "\x1b" not in line
json.loads(line)' 2>/dev/null; then
    pass "logs: JSON lines without colour"
else
    fail "logs: first line is not plain JSON: $first_log"
fi

# ---- one instance through the container --------------------------------------------------
tenant="imt-image-$$"
name="tenants/$tenant/instances/wp"
client() { podman exec "$CONTAINER" instance-manager "$@"; }
# Prints the instance's state name (ACTIVE, ...) or nothing.
state_of() {
    client get "$name" --output json 2>/dev/null |
        "$IM_VENV/bin/python" -c 'import json, sys
print(json.load(sys.stdin).get("state", "").removeprefix("INSTANCE_STATE_"))' 2>/dev/null || true
}
# Polls until the instance is in one of the states given; prints the last state seen.
wait_state() {
    local deadline=$(($(date +%s) + OPERATION_DEADLINE_SECS)) state="" wanted
    while [ "$(date +%s)" -lt "$deadline" ] && running; do
        state="$(state_of)"
        for wanted in "$@"; do
            if [ "$state" = "$wanted" ]; then
                printf '%s' "$state"
                return
            fi
        done
        sleep 1
    done
    printf '%s' "${state:-unknown}"
}

t0="$(now)"
if create_out="$(client create "$name" --environment dev --organization "Image Test" \
    --contact-email ops@example.com --output json 2>&1)"; then
    state="$(wait_state ACTIVE FAILED)"
    if [ "$state" = ACTIVE ]; then
        pass "CreateInstance through the container: $name ACTIVE"
        timings+=("CreateInstance to ACTIVE: $(elapsed "$t0" "$(now)")")
    else
        fail "CreateInstance through the container: $name ended $state"
    fi
else
    fail "CreateInstance through the container refused: $create_out"
fi

# Also the clean-up: the tenant's database and user leave the shared MariaDB.
t0="$(now)"
if delete_out="$(client delete "$name" --skip-archive --output json 2>&1)"; then
    state="$(wait_state DEPROVISIONED FAILED)"
    if [ "$state" = DEPROVISIONED ]; then
        pass "DeleteInstance through the container: DEPROVISIONED"
        timings+=("DeleteInstance to DEPROVISIONED: $(elapsed "$t0" "$(now)")")
    else
        fail "DeleteInstance through the container: ended $state (drop tenant_* of $tenant from MariaDB by hand)"
    fi
else
    fail "DeleteInstance through the container refused: $delete_out"
fi

[ "$failures" -eq 0 ]
