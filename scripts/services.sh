#!/usr/bin/env bash
# Make sure a Redis and a PostgreSQL answer, starting private ones under .run/ if needed.
#
#   eval "$(scripts/services.sh up)"   # prints `export ALLOT_REDIS_URL=…` / `export ALLOT_DATABASE_URL=…`
#   scripts/services.sh down           # stops the private servers (the system ones are left alone)
#   scripts/services.sh status
#
# `up` first tries $ALLOT_REDIS_URL (default redis://127.0.0.1:6379/0) and $ALLOT_DATABASE_URL
# (default postgresql://postgres@127.0.0.1:5432/allot). Whatever does not answer is replaced by a
# private server: redis-server on 127.0.0.1:6390 (durable: AOF in .run/redis with appendfsync
# always, as allot expects of every Redis) and a PostgreSQL cluster in .run/pg/data on
# 127.0.0.1:5440 (trust auth, user postgres). A Redis that answers but may lose acknowledged
# writes on a power loss is used, with a warning. Only the export lines go to stdout;
# everything meant for humans goes to stderr. Ports can be moved with ALLOT_PRIVATE_REDIS_PORT and
# ALLOT_PRIVATE_PG_PORT.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$ROOT/.run"
REDIS_DIR="$RUN_DIR/redis"
PG_DIR="$RUN_DIR/pg"
PG_DATA="$PG_DIR/data"
PG_SOCK="$PG_DIR/sock"
PG_LOG="$PG_DIR/log/postgres.log"

REDIS_PORT="${ALLOT_PRIVATE_REDIS_PORT:-6390}"
PG_PORT="${ALLOT_PRIVATE_PG_PORT:-5440}"
PRIVATE_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/0"
PRIVATE_PG_URL="postgresql://postgres@127.0.0.1:${PG_PORT}/allot"
WAIT_SECONDS=20

say() { printf 'services: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

find_pg_bin() {
    # initdb/pg_ctl/postgres are often not on PATH on Debian; fall back to the versioned directory.
    local name="$1" dir
    if command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
        return 0
    fi
    for dir in $(printf "%s\n" /usr/lib/postgresql/*/bin | sort -rV); do
        if [[ -x "$dir/$name" ]]; then
            echo "$dir/$name"
            return 0
        fi
    done
    return 1
}

# Run a command as the postgres OS user when we are root (PostgreSQL refuses to run as root).
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# ---------------------------------------------------------------- Redis

redis_answers() {
    local url="$1"
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(timeout 3 redis-cli -u "$url" ping 2>/dev/null || true)" == "PONG" ]]
    else
        timeout 3 python3 - "$url" <<'PY' >/dev/null 2>&1
import socket, sys
from urllib.parse import unquote, urlsplit
u = urlsplit(sys.argv[1])
with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=2) as s:
    if u.password:
        args = [b"AUTH"] + ([unquote(u.username).encode()] if u.username else []) + [unquote(u.password).encode()]
        s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
        if not s.recv(64).startswith(b"+OK"):
            sys.exit(1)
    s.sendall(b"*1\r\n$4\r\nPING\r\n")
    sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
PY
    fi
}

start_private_redis() {
    command -v redis-server >/dev/null 2>&1 || die "redis-server is not installed"
    mkdir -p "$REDIS_DIR"
    say "starting private redis-server on 127.0.0.1:${REDIS_PORT} (AOF in .run/redis, appendfsync always)"
    redis-server \
        --bind 127.0.0.1 --port "$REDIS_PORT" \
        --daemonize yes \
        --pidfile "$REDIS_DIR/redis.pid" \
        --logfile "$REDIS_DIR/redis.log" \
        --dir "$REDIS_DIR" \
        --save "" --appendonly yes --appendfsync always \
        >&2 || die "redis-server failed to start; see $REDIS_DIR/redis.log"
    local i
    for ((i = 0; i < WAIT_SECONDS * 4; i++)); do
        redis_answers "$PRIVATE_REDIS_URL" && return 0
        sleep 0.25
    done
    tail -n 20 "$REDIS_DIR/redis.log" >&2 || true
    die "private redis did not answer within ${WAIT_SECONDS}s"
}

# Say so when a Redis keeps acknowledged writes only in memory or fsyncs them later: a power
# loss would then lose reservations already answered 201 (allot refuses the rounds it notices).
warn_if_not_durable() {
    local url="$1" appendonly appendfsync
    command -v redis-cli >/dev/null 2>&1 || return 0
    appendonly="$(timeout 3 redis-cli -u "$url" config get appendonly 2>/dev/null | sed -n 2p || true)"
    appendfsync="$(timeout 3 redis-cli -u "$url" config get appendfsync 2>/dev/null | sed -n 2p || true)"
    [[ -n "$appendonly" ]] || return 0   # CONFIG may be disabled; nothing to say then
    if [[ "$appendonly" != "yes" || "$appendfsync" != "always" ]]; then
        say "warning: redis at $url runs with appendonly=${appendonly} appendfsync=${appendfsync};"
        say "  production needs appendonly yes + appendfsync always (docs/architecture.md)"
    fi
}

ensure_redis() {
    local url="${ALLOT_REDIS_URL:-redis://127.0.0.1:6379/0}"
    if redis_answers "$url"; then
        say "redis answers at $url"
        warn_if_not_durable "$url"
        REDIS_URL="$url"
        return 0
    fi
    say "redis does not answer at $url"
    if ! redis_answers "$PRIVATE_REDIS_URL"; then
        start_private_redis
    else
        say "private redis already running on port ${REDIS_PORT}"
    fi
    REDIS_URL="$PRIVATE_REDIS_URL"
}

stop_private_redis() {
    local pidfile="$REDIS_DIR/redis.pid" pid i
    if [[ ! -f "$pidfile" ]]; then
        say "private redis: not running"
        return 0
    fi
    pid="$(cat "$pidfile")"
    if ! kill -0 "$pid" 2>/dev/null; then
        say "private redis: stale pidfile removed"
        rm -f "$pidfile"
        return 0
    fi
    # Make sure the pid really is our redis-server before signalling it.
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" != redis-server* ]]; then
        say "private redis: pid $pid is not a redis-server; pidfile removed"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid"
    for ((i = 0; i < WAIT_SECONDS * 4; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "private redis: did not stop, killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    say "private redis stopped"
}

# ---------------------------------------------------------------- PostgreSQL

pg_answers() {
    pg_isready -q -t 3 -d "$1" >/dev/null 2>&1
}

# postgres must be able to reach .run/pg/…: give o+x to ancestors that lack it (traversal only).
make_traversable() {
    [[ $EUID -eq 0 ]] || return 0
    local dir="$PG_DIR" ancestors=() i
    while [[ "$dir" != "/" ]]; do
        dir="$(dirname "$dir")"
        ancestors=("$dir" "${ancestors[@]}")
    done
    # Top down, so that a directory is only judged once its parents are reachable.
    for i in "${ancestors[@]}"; do
        if ! runuser -u postgres -- test -x "$i" 2>/dev/null; then
            say "granting traversal (o+x) on $i so the postgres user can reach .run/pg"
            chmod o+x "$i"
        fi
    done
}

start_private_pg() {
    local initdb pg_ctl
    initdb="$(find_pg_bin initdb)" || die "initdb not found (install postgresql)"
    pg_ctl="$(find_pg_bin pg_ctl)" || die "pg_ctl not found (install postgresql)"
    if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        die "running as root but there is no 'postgres' OS user to run PostgreSQL as"
    fi
    mkdir -p "$PG_DIR" "$PG_SOCK" "$(dirname "$PG_LOG")"
    if [[ $EUID -eq 0 ]]; then
        chown postgres: "$PG_DIR" "$PG_SOCK" "$(dirname "$PG_LOG")"
        if [[ -d "$PG_DATA" ]]; then chown -R postgres: "$PG_DATA"; fi
    fi
    make_traversable
    if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
        say "initialising a private PostgreSQL cluster in .run/pg/data"
        rm -rf "$PG_DATA"
        as_pg "$initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C --no-sync \
            >"$PG_DIR/initdb.log" 2>&1 || {
            tail -n 20 "$PG_DIR/initdb.log" >&2
            die "initdb failed; see $PG_DIR/initdb.log"
        }
    fi
    say "starting private PostgreSQL on 127.0.0.1:${PG_PORT} (log in .run/pg/log)"
    # pg_ctl -w waits (bounded by -t) until the server accepts connections.
    as_pg "$pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$WAIT_SECONDS" \
        -o "-p $PG_PORT -k $PG_SOCK -c listen_addresses=127.0.0.1" start >&2 || {
        tail -n 20 "$PG_LOG" >&2 || true
        die "private PostgreSQL did not start; see $PG_LOG"
    }
    local i
    for ((i = 0; i < WAIT_SECONDS * 4; i++)); do
        pg_answers "postgresql://postgres@127.0.0.1:${PG_PORT}/postgres" && return 0
        sleep 0.25
    done
    die "private PostgreSQL did not answer within ${WAIT_SECONDS}s"
}

# Create the database named in the URL if it is missing (`allot migrate` would create it too,
# but tests connect straight away). Best effort: needs psql and a role allowed to CREATE DATABASE.
ensure_database() {
    local url="${1%%\?*}" name admin
    name="${url##*/}"
    admin="${url%/*}/postgres"
    [[ -n "$name" && "$name" != "postgres" && "$url" == *://*/* ]] || return 0
    if ! command -v psql >/dev/null 2>&1; then
        say "psql not found; not checking that database '$name' exists"
        return 0
    fi
    if [[ ! "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
        say "not creating database '$name' (unusual name); allot migrate will"
        return 0
    fi
    local exists
    exists="$(PGCONNECT_TIMEOUT=5 psql -X -w -qtA -d "$admin" -c "SELECT 1 FROM pg_database WHERE datname = '$name'" 2>/dev/null || true)"
    if [[ "$exists" != "1" ]]; then
        if PGCONNECT_TIMEOUT=5 psql -X -w -q -d "$admin" -c "CREATE DATABASE \"$name\"" >/dev/null 2>&1; then
            say "created database $name"
        else
            say "warning: could not create database $name (allot migrate will try again)"
        fi
    fi
}

ensure_pg() {
    local url="${ALLOT_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/allot}"
    command -v pg_isready >/dev/null 2>&1 || die "pg_isready not found (install postgresql-client)"
    if pg_answers "$url"; then
        say "postgresql answers at $url"
        ensure_database "$url"
        DATABASE_URL="$url"
        return 0
    fi
    say "postgresql does not answer at $url"
    if ! pg_answers "postgresql://postgres@127.0.0.1:${PG_PORT}/postgres"; then
        start_private_pg
    else
        say "private PostgreSQL already running on port ${PG_PORT}"
    fi
    ensure_database "$PRIVATE_PG_URL"
    DATABASE_URL="$PRIVATE_PG_URL"
}

stop_private_pg() {
    if [[ ! -f "$PG_DATA/postmaster.pid" ]]; then
        say "private PostgreSQL: not running"
        return 0
    fi
    local pg_ctl
    pg_ctl="$(find_pg_bin pg_ctl)" || die "pg_ctl not found"
    if as_pg "$pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
        as_pg "$pg_ctl" -D "$PG_DATA" -m fast -w -t "$WAIT_SECONDS" stop >&2
        say "private PostgreSQL stopped"
    else
        say "private PostgreSQL: not running (stale postmaster.pid)"
    fi
}

# ---------------------------------------------------------------- main

cmd="${1:-}"
case "$cmd" in
    up)
        ensure_redis
        ensure_pg
        printf 'export ALLOT_REDIS_URL=%q\n' "$REDIS_URL"
        printf 'export ALLOT_DATABASE_URL=%q\n' "$DATABASE_URL"
        ;;
    down)
        stop_private_redis
        stop_private_pg
        ;;
    status)
        if redis_answers "$PRIVATE_REDIS_URL"; then say "private redis: running on ${REDIS_PORT}"; else say "private redis: not running"; fi
        if pg_answers "postgresql://postgres@127.0.0.1:${PG_PORT}/postgres"; then say "private PostgreSQL: running on ${PG_PORT}"; else say "private PostgreSQL: not running"; fi
        ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
