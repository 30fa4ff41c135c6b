#!/usr/bin/env bash
# Stop the service processes scripts/up.sh started locally (from .run/<name>.pid):
# SIGTERM (they drain and finish in-flight work), up to 30 s, then SIGKILL.
# RabbitMQ and PostgreSQL are left running. In Docker mode use `docker compose down`.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stop_local_services
say "stopped (logs kept in $RUN_DIR)"
