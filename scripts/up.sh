#!/usr/bin/env bash
# Run the whole aodm system and its demo — the one "run it" command:
#
#   bash scripts/up.sh
#
# With a Docker engine (`docker info` works): builds the image, starts RabbitMQ,
# PostgreSQL, registry, session and notifier with docker compose (waiting until they
# are healthy), then runs the demo container. Stop with `docker compose down`.
#
# Without one: prepares .venv, RabbitMQ and PostgreSQL like scripts/test.sh, starts the
# three services as background processes (logs .run/<name>.log, pids .run/<name>.pid,
# health/metrics on 127.0.0.1:8081 registry, 8082 session, 8083 notifier), waits for
# each /readyz, then runs `aodm demo`. Stop with `bash scripts/down.sh`.
#
# Environment (local mode): AODM_AMQP_URL, AODM_DATABASE_URL and the other AODM_* settings
# (shared/config.py) are passed to the services and the demo; unset, the defaults from
# shared/config.py apply (local RabbitMQ as guest, PostgreSQL as root, database aodm).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

declare -A HTTP_PORTS=([registry]=8081 [session]=8082 [notifier]=8083)

config_default() {
    (cd "$ROOT" && "$VENV/bin/python" -c 'import sys; from shared.config import VARIABLES; print(VARIABLES[sys.argv[1]][0])' "$1")
}

compose_command() {
    if docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif have docker-compose; then
        echo "docker-compose"
    fi
}

up_with_docker() {
    local compose="$1"
    cd "$ROOT"
    say "starting the stack with $compose"
    $compose up --build -d --wait rabbitmq postgres registry session notifier
    say "running the demo"
    $compose run --rm demo
    cat <<EOF

aodm is running in Docker.
  RabbitMQ dashboard:  http://localhost:15672  (user aodm-admin, password aodm-admin)
  RabbitMQ metrics:    http://localhost:15692/metrics
  Logs:                $compose logs -f registry session notifier
  More session workers: $compose up -d --scale session=3
  Demo again:          $compose run --rm demo
  Stop:                $compose down   (add -v to drop the data volumes)
EOF
}

up_locally() {
    prepare_venv
    # The same URLs the services will read (shared/config.py defaults when unset).
    AODM_AMQP_URL="${AODM_AMQP_URL:-$(config_default AODM_AMQP_URL)}"
    AODM_DATABASE_URL="${AODM_DATABASE_URL:-$(config_default AODM_DATABASE_URL)}"
    export AODM_AMQP_URL AODM_DATABASE_URL
    prepare_rabbitmq "$AODM_AMQP_URL"
    prepare_postgres "$AODM_DATABASE_URL"

    stop_local_services
    # If a service fails to come up, don't leave the others running.
    trap stop_local_services EXIT
    local name
    for name in "${SERVICES[@]}"; do
        start_local_service "$name" "${HTTP_PORTS[$name]}"
    done
    for name in "${SERVICES[@]}"; do
        wait_local_service "$name" "${HTTP_PORTS[$name]}"
    done
    trap - EXIT

    say "running the demo (.venv/bin/aodm demo)"
    (cd "$ROOT" && "$VENV/bin/aodm" demo) \
        || die "the demo failed; the services keep running (logs: $RUN_DIR/*.log, stop: bash scripts/down.sh)"

    local mgmt_host
    mgmt_host="$(url_part "$AODM_AMQP_URL" host)"
    cat <<EOF

aodm is running as local processes.
  Logs:        $RUN_DIR/{registry,session,notifier}.log
  Health:      http://127.0.0.1:{8081,8082,8083}/readyz   metrics: .../metrics
  RabbitMQ dashboard: http://${mgmt_host:-127.0.0.1}:15672
  Demo again:  .venv/bin/aodm demo
  Stop:        bash scripts/down.sh
EOF
}

main() {
    local compose=""
    if have docker && docker info >/dev/null 2>&1; then
        compose="$(compose_command)"
        [ -n "$compose" ] || warn "a Docker engine answers but docker compose is missing: running locally instead"
    fi
    if [ -n "$compose" ]; then
        up_with_docker "$compose"
    else
        up_locally
    fi
}

main "$@"
