#!/usr/bin/env bash
# Make sure a MariaDB/MySQL server answers on 127.0.0.1:3306.
#
#   scripts/mariadb.sh ensure   if a server answers, do nothing; else start the
#                               installed mariadbd; else (as root, with apt-get)
#                               install mariadb-server and start it; else fail
#                               saying how to get one.
#   scripts/mariadb.sh status   exit 0 if a server answers.
#
# A server this script starts itself is set up like the project's machines:
# root@localhost may log in over TCP with an empty password, database `test`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HOST=127.0.0.1
PORT=3306
MARIADBD="${MARIADBD:-/usr/sbin/mariadbd}"
READY_TRIES=120    # x 0.5 s = 60 s
LOG="$IM_RUN/mariadb.log"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

admin_bin() {
    local b
    for b in mariadb-admin mysqladmin; do
        if command -v "$b" >/dev/null 2>&1; then printf '%s\n' "$b"; return 0; fi
    done
    return 1
}

client_bin() {
    local b
    for b in mariadb mysql; do
        if command -v "$b" >/dev/null 2>&1; then printf '%s\n' "$b"; return 0; fi
    done
    return 1
}

# Something answers on 127.0.0.1:3306? 'ping' exits 0 even when access is
# denied, but not when the server refuses the host (a fresh Debian install
# with skip-name-resolve and no root@127.0.0.1), so a listening port counts
# too: mariadbd only listens once it is ready for connections.
answers() {
    local admin
    if admin="$(admin_bin)" \
        && "$admin" --protocol=tcp -h "$HOST" -P "$PORT" -u root --connect-timeout=2 ping >/dev/null 2>&1; then
        return 0
    fi
    port_open "$HOST" "$PORT"
}

is_root() { [ "$(id -u)" = 0 ]; }

install_server() {
    info "installing mariadb-server with apt-get"
    mkdir -p "$IM_RUN"
    # Do not let the package's own init scripts fail the install in a container.
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mariadb-server mariadb-client; } \
        >"$IM_RUN/mariadb-install.log" 2>&1; then
        show_log_tail "$IM_RUN/mariadb-install.log"
        die "apt-get install mariadb-server failed (log: $IM_RUN/mariadb-install.log)"
    fi
}

start_server() {
    local datadir=/var/lib/mysql i
    mkdir -p "$IM_RUN"
    command -v start-stop-daemon >/dev/null 2>&1 \
        || die "start-stop-daemon not found; start MariaDB on $HOST:$PORT yourself (e.g. 'service mariadb start')."
    id mysql >/dev/null 2>&1 || die "no 'mysql' system user; reinstall mariadb-server."
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    if [ ! -d "$datadir/mysql" ]; then
        info "initialising $datadir"
        command -v mariadb-install-db >/dev/null 2>&1 || die "mariadb-install-db not found; reinstall mariadb-server."
        install -d -o mysql -g mysql -m 0755 "$datadir"
        if ! mariadb-install-db --user=mysql --datadir="$datadir" >"$LOG" 2>&1; then
            show_log_tail "$LOG"
            die "mariadb-install-db failed (log: $LOG)"
        fi
    fi
    info "starting $MARIADBD"
    start-stop-daemon --start --oknodo --background --exec "$MARIADBD" -- --user=mysql \
        || die "start-stop-daemon could not start $MARIADBD"
    for ((i = 0; i < READY_TRIES; i++)); do
        if answers; then
            info "MariaDB answers on $HOST:$PORT"
            return 0
        fi
        sleep 0.5
    done
    # mariadbd logs to syslog/journal or its error log; show what we can.
    for f in /var/log/mysql/error.log "$datadir"/*.err; do
        [ -f "$f" ] && show_log_tail "$f"
    done
    die "started $MARIADBD but nothing answers on $HOST:$PORT after $((READY_TRIES / 2)) s. Is it configured for another port or bind-address (see /etc/mysql)?"
}

# Give a server we started ourselves the setup the project expects
# (root over TCP with an empty password, database test). Uses the local
# socket, where root is admitted by unix_socket auth on Debian.
# Note: with skip-name-resolve, 127.0.0.1 does not match 'localhost'.
configure_fresh_server() {
    local client
    client="$(client_bin)" || return 0
    if "$client" --protocol=tcp -h "$HOST" -P "$PORT" -u root -e 'SELECT 1' >/dev/null 2>&1; then
        "$client" --protocol=tcp -h "$HOST" -P "$PORT" -u root -e 'CREATE DATABASE IF NOT EXISTS test' >/dev/null 2>&1 || true
        return 0
    fi
    info "allowing root@localhost over TCP with an empty password"
    if ! "$client" -u root >"$LOG.setup" 2>&1 <<'SQL'
ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket;
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
CREATE DATABASE IF NOT EXISTS test;
FLUSH PRIVILEGES;
SQL
    then
        show_log_tail "$LOG.setup"
        warn "could not configure root login over TCP; tests that log in as root without a password will fail"
        return 0
    fi
    if ! "$client" --protocol=tcp -h "$HOST" -P "$PORT" -u root -e 'SELECT 1' >/dev/null 2>&1; then
        warn "root still cannot log in over TCP without a password; tests that do will fail"
    fi
}

cmd_ensure() {
    if answers; then
        info "MariaDB already answers on $HOST:$PORT"
        return 0
    fi
    if [ ! -x "$MARIADBD" ]; then
        if is_root && command -v apt-get >/dev/null 2>&1; then
            install_server
            [ -x "$MARIADBD" ] || die "mariadb-server installed but $MARIADBD is missing"
            # The package may have started it already.
            if answers; then configure_fresh_server; return 0; fi
        else
            die "no MySQL-compatible server answers on $HOST:$PORT and MariaDB is not installed. Install and start one, e.g. 'sudo apt-get install mariadb-server && sudo service mariadb start' (Debian/Ubuntu), with root allowed to log in over TCP without a password."
        fi
    fi
    if ! is_root; then
        die "MariaDB is installed but not running on $HOST:$PORT, and starting it needs root. Run e.g. 'sudo service mariadb start'."
    fi
    start_server
    configure_fresh_server
}

case "${1:-}" in
    ensure) cmd_ensure ;;
    status) answers ;;
    *) usage ;;
esac
