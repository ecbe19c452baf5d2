# shellcheck shell=bash
# Shared helpers for the scripts in this directory. Source it; do not run it.
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Repository root (the directory holding Cargo.toml), independent of $PWD.
IM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IM_VENV="$IM_ROOT/.venv"
IM_RUN="$IM_ROOT/.run"
export IM_ROOT IM_VENV IM_RUN

# Test region and credentials for moto. Always these values, whatever the
# caller's shell has: the emulator scripts must never pick up real AWS
# credentials or a profile.
im_export_aws_test_env() {
    export AWS_REGION=us-east-1
    export AWS_DEFAULT_REGION=us-east-1
    export AWS_ACCESS_KEY_ID=testing
    export AWS_SECRET_ACCESS_KEY=testing
    unset AWS_SESSION_TOKEN AWS_PROFILE AWS_DEFAULT_PROFILE AWS_ROLE_ARN AWS_WEB_IDENTITY_TOKEN_FILE
    # Keep the SDK away from the instance metadata service.
    export AWS_EC2_METADATA_DISABLED=true
}

im_script_name() { basename "${0:-script}"; }

# info: to stderr, only when IM_VERBOSE is set (scripts are quiet on success).
info() { if [ -n "${IM_VERBOSE:-}" ]; then printf '%s: %s\n' "$(im_script_name)" "$*" >&2; fi; }
# say: always shown (for the few lines a user must see).
say() { printf '%s: %s\n' "$(im_script_name)" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$(im_script_name)" "$*" >&2; }
die() { printf '%s: error: %s\n' "$(im_script_name)" "$*" >&2; exit 1; }

# Is a TCP port accepting connections? (bash /dev/tcp, no external tools)
port_open() {
    local host="$1" port="$2"
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# Print a currently free TCP port on 127.0.0.1.
free_port() {
    local py
    for py in "$IM_VENV/bin/python" python3 python; do
        if command -v "$py" >/dev/null 2>&1; then
            "$py" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
            return
        fi
    done
    die "no python found to pick a free port"
}

# Is the process with this pid alive?
pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Show the last lines of a log file on stderr (for failure reports).
show_log_tail() {
    local file="$1" n="${2:-40}"
    if [ -s "$file" ]; then
        printf -- '----- last %s lines of %s -----\n' "$n" "$file" >&2
        tail -n "$n" "$file" >&2
        printf -- '-----\n' >&2
    fi
}
