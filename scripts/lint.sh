#!/usr/bin/env bash
# Lint the repo (the check meant for CI, beside scripts/test.sh):
#
#   bash scripts/lint.sh
#
#   - ruff check on the whole repo (aodm, shared, services, bench, tests, scripts), with the
#     rules in pyproject.toml's [tool.ruff];
#   - mypy --strict on the client package aodm/ ([tool.mypy]).
# Both run, then it exits non-zero if either found anything.
#
# Idempotent. It prepares .venv as scripts/test.sh does, then installs the exact versions
# pinned in pyproject.toml's `lint` extra (pip does nothing when they are there already).
# Fix what ruff can with `.venv/bin/ruff check --fix .`.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lint_pins() { # the `lint` extra's requirements, one a line
    "$VENV/bin/python" - "$ROOT/pyproject.toml" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    print("\n".join(tomllib.load(file)["project"]["optional-dependencies"]["lint"]))
EOF
}

prepare_lint_tools() {
    local pins=()
    mapfile -t pins < <(lint_pins)
    (( ${#pins[@]} )) || die "pyproject.toml has no lint extra"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" \
        || die "could not install ${pins[*]}"
}

main() {
    prepare_venv
    prepare_lint_tools
    local status=0
    cd "$ROOT"
    say "running: ruff check ."
    "$VENV/bin/ruff" check . || status=1
    say "running: mypy (strict, aodm/)"
    "$VENV/bin/mypy" || status=1
    if (( status )); then
        printf 'error: lint found problems (above)\n' >&2
    fi
    return "$status"
}

main "$@"
