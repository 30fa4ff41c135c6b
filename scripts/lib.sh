# Shared preparation for scripts/test.sh and scripts/up.sh (sourced, not run).
#
#   prepare_venv      .venv with the project installed editable ('.[server,test,bench]'),
#                     the services' dependencies at the versions of requirements/server.lock;
#                     reinstalled only when pyproject.toml or the lock changed (stamp in .venv)
#   prepare_rabbitmq AMQP_URL [MANAGEMENT_URL]
#                     RabbitMQ answering on AMQP and the management API (default
#                     http://USER:PASSWORD@HOST:15672 from AMQP_URL), with the plugins
#                     aodm needs; installed (apt-get) and started if missing
#   prepare_postgres DATABASE_URL
#                     PostgreSQL accepting connections as the URL's user (role and
#                     local trust auth created if needed); installed and started if missing
#   prepare_node      Node.js and npm (apt-get if missing) and `npm ci` in each of
#                     NODE_PROJECTS, redone only when its package-lock.json or the Node.js
#                     version changed (stamp in its node_modules)
#   stop_local_services / start_local_service / wait_local_service   .run/ processes
#
# Only brokers/databases on this machine (127.0.0.1, localhost, ::1) are installed,
# started or configured; for a remote URL the scripts only check that it answers.
# AODM_WAIT_SECONDS bounds each wait (default 120).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
RUN_DIR="$ROOT/.run"
INSTALL_SPEC='.[server,test,bench]'
LOCK_FILE="$ROOT/requirements/server.lock"  # the services' exact versions, as in the image
RABBITMQ_PLUGINS=(rabbitmq_management rabbitmq_prometheus rabbitmq_sharding rabbitmq_consistent_hash_exchange)
# shellcheck disable=SC2034  # used by up.sh
SERVICES=(registry session notifier)
: "${AODM_WAIT_SECONDS:=120}"

say() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# Run a command as root (directly, or through password-less sudo).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif have sudo && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "need root for: $* (run as root, or install/start it yourself)"
    fi
}

# Run a command as the postgres OS user (peer authentication on the local socket).
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
    elif have sudo && sudo -n true 2>/dev/null; then
        sudo -n -u postgres "$@"
    else
        die "need root (or password-less sudo) to run as the postgres user: $*"
    fi
}

apt_install() {
    have apt-get || die "$* missing and apt-get is not available: install $* yourself"
    say "installing $* with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# url_part URL host|port|user|password|path — fields of a URL (port: default by scheme).
url_part() {
    python3 - "$1" "$2" <<'PY'
import sys
from urllib.parse import urlsplit, unquote

url, field = sys.argv[1], sys.argv[2]
u = urlsplit(url)
defaults = {"amqp": 5672, "amqps": 5671, "postgresql": 5432, "postgres": 5432, "http": 80, "https": 443}
value = {
    "host": u.hostname or "",
    "port": u.port or defaults.get(u.scheme, ""),
    "user": unquote(u.username or ""),
    "password": unquote(u.password or ""),
    "path": u.path,
}[field]
print(value)
PY
}

is_local_host() {
    case "$1" in
        "" | 127.0.0.1 | localhost | ::1) return 0 ;;
        *) return 1 ;;
    esac
}

# tcp_open HOST PORT — does something accept connections there?
tcp_open() {
    python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError:
    sys.exit(1)
PY
}

# http_ok URL [USER:PASSWORD] — does the URL answer 2xx?
http_ok() {
    python3 - "$@" <<'PY'
import base64, sys, urllib.request
request = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    request.add_header("Authorization", "Basic " + base64.b64encode(sys.argv[2].encode()).decode())
try:
    with urllib.request.urlopen(request, timeout=3) as response:
        sys.exit(0 if 200 <= response.status < 300 else 1)
except OSError:
    sys.exit(1)
PY
}

# poll SECONDS COMMAND... — run COMMAND every second until it succeeds (0) or time is up (1).
poll() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 1
    done
}

# wait_until WHAT SECONDS COMMAND... — poll, and fail naming WHAT on timeout.
wait_until() {
    local what="$1" seconds="$2"
    shift 2
    poll "$seconds" "$@" || die "timed out after ${seconds}s waiting for $what"
}

# ------------------------------------------------------------------------ Node.js

# The Node.js tooling the tests run: the AsyncAPI validator and the example client.
NODE_PROJECTS=(tools/asyncapi examples/node)

node_stamp() { # node_stamp DIR — what its node_modules depends on: the lock and the Node.js version
    { cat "$ROOT/$1/package-lock.json"; node --version; } \
        | python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

prepare_node() {
    { have node && have npm; } || apt_install nodejs npm
    { have node && have npm; } || die "node and npm are required (tools/asyncapi, examples/node): install Node.js 18+"
    local dir stamp_file stamp
    for dir in "${NODE_PROJECTS[@]}"; do
        [ -f "$ROOT/$dir/package-lock.json" ] || continue
        stamp_file="$ROOT/$dir/node_modules/.aodm-install-stamp"
        stamp="$(node_stamp "$dir")"
        if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
            continue
        fi
        say "installing the Node.js dependencies of $dir (npm ci, node $(node --version))"
        (cd "$ROOT/$dir" && SCARF_ANALYTICS=false npm ci --no-audit --no-fund --loglevel=error) || die "npm ci in $dir failed"
        echo "$stamp" >"$stamp_file"
    done
}

# ---------------------------------------------------------------------------- venv

venv_stamp() {
    # What the installed environment depends on: the project metadata, the lock, the extras, the Python.
    {
        cat "$ROOT/pyproject.toml" "$LOCK_FILE"
        echo "$INSTALL_SPEC"
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
    } | python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

prepare_venv() {
    have python3 || die "python3 is required"
    if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        say "creating $VENV"
        rm -rf "$VENV"
        if ! python3 -m venv "$VENV"; then
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV" || die "python3 -m venv failed"
        fi
    fi
    local stamp_file="$VENV/.aodm-install-stamp" stamp
    stamp="$(venv_stamp)"
    if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
        return 0
    fi
    say "installing the project into $VENV (pip install -c requirements/server.lock -e '$INSTALL_SPEC')"
    (cd "$ROOT" && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$LOCK_FILE" -e "$INSTALL_SPEC") \
        || die "pip install -c requirements/server.lock -e '$INSTALL_SPEC' failed"
    echo "$stamp" >"$stamp_file"
}

# ------------------------------------------------------------------------ RabbitMQ

rabbitmq_ping() { rabbitmq-diagnostics -q ping >/dev/null 2>&1; }

rabbitmq_missing_plugins() {
    local enabled plugin
    enabled="$(rabbitmq-plugins -q list -e -m 2>/dev/null || true)"
    for plugin in "${RABBITMQ_PLUGINS[@]}"; do
        grep -qx "$plugin" <<<"$enabled" || echo "$plugin"
    done
}

# start_local_rabbitmq — install if missing, start if down, enable the plugins.
start_local_rabbitmq() {
    have rabbitmq-server || apt_install rabbitmq-server
    if ! rabbitmq_ping; then
        if pgrep -f 'beam.*rabbit' >/dev/null 2>&1; then
            say "RabbitMQ: node is starting, waiting for it"
        else
            say "RabbitMQ: starting (rabbitmq-server -detached)"
            as_root rabbitmq-plugins -q enable --offline "${RABBITMQ_PLUGINS[@]}" >/dev/null 2>&1 || true
            as_root rabbitmq-server -detached || warn "rabbitmq-server -detached returned an error"
        fi
    fi
    wait_until "RabbitMQ to answer 'rabbitmq-diagnostics ping' (is rabbitmq-server installed and startable?)" \
        "$AODM_WAIT_SECONDS" rabbitmq_ping

    local missing
    missing="$(rabbitmq_missing_plugins)"
    if [ -n "$missing" ]; then
        say "RabbitMQ: enabling plugins: ${missing//$'\n'/ }"
        as_root rabbitmq-plugins -q enable "${RABBITMQ_PLUGINS[@]}" >/dev/null \
            || die "rabbitmq-plugins enable ${RABBITMQ_PLUGINS[*]} failed"
    fi
}

prepare_rabbitmq() {
    local url="$1" management="${2:-}" host port user password
    host="$(url_part "$url" host)"
    port="$(url_part "$url" port)"
    user="$(url_part "$url" user)"
    password="$(url_part "$url" password)"
    host="${host:-127.0.0.1}"
    user="${user:-guest}"
    password="${password:-guest}"
    if [ -n "$management" ]; then
        user="$(url_part "$management" user)"
        password="$(url_part "$management" password)"
        management="http://$(url_part "$management" host):$(url_part "$management" port)"
    else
        management="http://$host:15672"
    fi

    if is_local_host "$host"; then
        start_local_rabbitmq
    else
        say "RabbitMQ: remote $host:$port, only checking that it answers"
    fi
    wait_until "RabbitMQ AMQP port $host:$port" "$AODM_WAIT_SECONDS" tcp_open "$host" "$port"
    wait_until "RabbitMQ management API on $management (user '$user')" "$AODM_WAIT_SECONDS" \
        http_ok "$management/api/overview" "$user:$password"
    say "RabbitMQ: ready on $host:$port"
}

# ---------------------------------------------------------------------- PostgreSQL

pg_ready() { pg_isready -q -h "$1" -p "$2"; }

# The clusters Debian's postgresql-common knows: "VERSION NAME" lines.
pg_clusters() {
    local dir
    for dir in /etc/postgresql/*/*/; do
        [ -f "$dir/postgresql.conf" ] || continue
        dir="${dir%/}"
        echo "$(basename "$(dirname "$dir")") $(basename "$dir")"
    done
}

start_postgres() {
    have pg_ctlcluster || die "PostgreSQL is not answering and pg_ctlcluster is not available: start it yourself"
    if [ -z "$(pg_clusters)" ]; then
        local version
        version="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)"
        [ -n "$version" ] || die "no PostgreSQL server installed under /usr/lib/postgresql"
        say "PostgreSQL: creating cluster $version/main"
        as_root pg_createcluster "$version" main >/dev/null
    fi
    local version name
    while read -r version name; do
        say "PostgreSQL: starting cluster $version/$name"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start 2>/dev/null \
            || warn "pg_ctlcluster $version $name start returned an error (maybe already starting)"
    done < <(pg_clusters)
}

# psql_check USER HOST PORT PASSWORD — can USER connect (to the maintenance database)?
psql_check() {
    PGPASSWORD="$4" PGCONNECT_TIMEOUT=5 psql -X -w -q -At -h "$2" -p "$3" -U "$1" -d postgres -c 'select 1' >/dev/null 2>&1
}

# Make USER a superuser role with trust authentication for local TCP connections.
configure_postgres_role() {
    local user="$1" hba
    [[ "$user" =~ ^[a-z_][a-z0-9_]*$ ]] || die "cannot create PostgreSQL role '$user' automatically: create it yourself"
    say "PostgreSQL: creating superuser role '$user' and trusting local TCP connections"
    as_postgres psql -X -q -v ON_ERROR_STOP=1 -d postgres <<SQL || die "could not create PostgreSQL role '$user'"
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$user') THEN CREATE ROLE "$user" LOGIN SUPERUSER; END IF;
END \$\$;
SQL
    hba="$(as_postgres psql -X -At -d postgres -c 'SHOW hba_file')" || die "could not locate pg_hba.conf"
    if ! as_root grep -q '^host all all 127.0.0.1/32 trust # aodm' "$hba"; then
        as_root sed -i '1i host all all 127.0.0.1/32 trust # aodm\nhost all all ::1/128 trust # aodm' "$hba"
    fi
    as_postgres psql -X -q -d postgres -c 'SELECT pg_reload_conf()' >/dev/null || die "could not reload PostgreSQL"
}

prepare_postgres() {
    local url="$1" host port user password
    host="$(url_part "$url" host)"
    port="$(url_part "$url" port)"
    user="$(url_part "$url" user)"
    password="$(url_part "$url" password)"
    host="${host:-127.0.0.1}"
    user="${user:-$(id -un)}"

    if ! is_local_host "$host"; then
        say "PostgreSQL: remote $host:$port, only checking that it answers"
        wait_until "PostgreSQL at $host:$port" "$AODM_WAIT_SECONDS" tcp_open "$host" "$port"
        return 0
    fi

    { have pg_isready && have psql && [ -n "$(ls /usr/lib/postgresql 2>/dev/null)" ]; } || apt_install postgresql
    if ! pg_ready "$host" "$port"; then
        # A freshly booted machine may still be starting it: give it a moment first.
        poll 5 pg_ready "$host" "$port" || start_postgres
    fi
    wait_until "PostgreSQL on $host:$port (pg_isready)" "$AODM_WAIT_SECONDS" pg_ready "$host" "$port"

    if ! psql_check "$user" "$host" "$port" "$password"; then
        configure_postgres_role "$user"
        wait_until "PostgreSQL to accept user '$user' on $host:$port" 30 psql_check "$user" "$host" "$port" "$password"
    fi
    say "PostgreSQL: ready on $host:$port (user '$user')"
}

# ---------------------------------------------------- local service processes (.run/)

# Is PID alive and one of our service processes (guards against pid reuse)?
is_our_process() {
    local pid="$1"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- '-m services\.'
}

stop_local_services() {
    local pidfile pid name waited
    [ -d "$RUN_DIR" ] || return 0
    for pidfile in "$RUN_DIR"/*.pid; do
        [ -f "$pidfile" ] || continue
        name="$(basename "$pidfile" .pid)"
        pid="$(cat "$pidfile")"
        if is_our_process "$pid"; then
            say "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            waited=0
            while is_our_process "$pid" && [ "$waited" -lt 30 ]; do
                sleep 1
                waited=$((waited + 1))
            done
            if is_our_process "$pid"; then
                warn "$name (pid $pid) still running after ${waited}s, killing it"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
        rm -f "$pidfile"
    done
}

# start_local_service NAME HTTP_PORT — a background `python -m services.NAME`.
start_local_service() {
    local name="$1" port="$2"
    mkdir -p "$RUN_DIR"
    say "starting $name (health/metrics on http://127.0.0.1:$port, log $RUN_DIR/$name.log)"
    (
        cd "$ROOT" || exit 1
        export AODM_HTTP_PORT="$port"
        exec setsid "$VENV/bin/python" -m "services.$name" >"$RUN_DIR/$name.log" 2>&1 </dev/null
    ) &
    echo $! >"$RUN_DIR/$name.pid"
}

# wait_local_service NAME HTTP_PORT — until its /readyz answers, or it dies.
wait_local_service() {
    local name="$1" port="$2" pid deadline
    pid="$(cat "$RUN_DIR/$name.pid")"
    deadline=$((SECONDS + AODM_WAIT_SECONDS))
    until "$VENV/bin/python" -m shared.health "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$RUN_DIR/$name.log" >&2 || true
            die "$name exited during start-up (log: $RUN_DIR/$name.log)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$RUN_DIR/$name.log" >&2 || true
            die "$name not ready after ${AODM_WAIT_SECONDS}s (log: $RUN_DIR/$name.log)"
        fi
        sleep 1
    done
    say "$name is ready"
}
