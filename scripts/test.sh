#!/usr/bin/env bash
# Run the aodm test suite — the one test command (README and CI use it):
#
#   bash scripts/test.sh              # = pytest -q
#   bash scripts/test.sh -k registry  # any pytest arguments
#
# Idempotent. It prepares, then runs .venv/bin/pytest with your arguments and exits
# with pytest's code ("no tests collected" counts as a failure):
#   - .venv (python3 -m venv) with `pip install -c requirements/server.lock -e '.[server,test,bench]'`
#     (the services' dependencies at their locked versions, as in the image), redone only when
#     pyproject.toml or the lock changed (stamp file in .venv);
#   - RabbitMQ up, with rabbitmq_management, rabbitmq_prometheus,
#     rabbitmq_sharding (x-modulus-hash) and rabbitmq_consistent_hash_exchange enabled and
#     the management API answering;
#   - PostgreSQL up and accepting the configured user;
#   - Node.js and npm, and `npm ci` in tools/asyncapi and examples/node when their
#     package-lock.json changed (the AsyncAPI validator and the Node.js example client).
# Missing RabbitMQ/PostgreSQL are installed with apt-get and started (needs root or
# password-less sudo); waits are bounded and fail with a message.
#
# Environment overrides (read by tests/conftest.py too; each run makes its own vhost and
# database there, so the suite can run beside a live stack):
#   AODM_TEST_AMQP_URL        broker      (default amqp://guest:guest@127.0.0.1:5672/)
#   AODM_TEST_DATABASE_URL    PostgreSQL server, maintenance database
#                             (default postgresql://root@127.0.0.1:5432/postgres)
#   AODM_TEST_MANAGEMENT_URL  RabbitMQ management API (default http://guest:guest@127.0.0.1:15672)
#   AODM_WAIT_SECONDS         max wait for each of RabbitMQ/PostgreSQL to come up (default 120)
# A non-local broker/database is only checked for reachability, never installed or started.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

run_pytest() {
    local status=0
    (( $# )) || set -- -q
    say "running: .venv/bin/pytest $*"
    (cd "$ROOT" && "$VENV/bin/pytest" "$@") || status=$?
    if [ "$status" -eq 5 ]; then
        printf 'error: pytest collected no tests (exit 5) — check the arguments/test paths\n' >&2
        return 1
    fi
    return "$status"
}

main() {
    prepare_venv
    prepare_rabbitmq "${AODM_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}" \
        "${AODM_TEST_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672}"
    prepare_postgres "${AODM_TEST_DATABASE_URL:-postgresql://root@127.0.0.1:5432/postgres}"
    prepare_node
    run_pytest "$@"
}

main "$@"
