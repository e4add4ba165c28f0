#!/usr/bin/env bash
# What `make run` executes after installing: servers up, migrate, demo data, then serve.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"   # config/default.toml is found relative to the working directory
if [[ -x "$ROOT/.venv/bin/allot" ]]; then
    PATH="$ROOT/.venv/bin:$PATH"
fi
command -v allot >/dev/null 2>&1 || { echo "run: 'allot' not found; run 'make install' first" >&2; exit 1; }

services="$(scripts/services.sh up)"   # a separate assignment, so that set -e sees a failure
eval "$services"

if [[ -z "${ALLOT_ID_PEPPER:-}" ]]; then
    export ALLOT_DEV=1
    cat >&2 <<'EOF'
************************************************************************
*  DEVELOPMENT MODE (ALLOT_DEV=1): ALLOT_ID_PEPPER is not set, so IDs  *
*  are hashed with a FIXED, PUBLICLY KNOWN development pepper.         *
*  Never use this for production or real citizens' data: set           *
*  ALLOT_ID_PEPPER to a long random secret instead.                    *
************************************************************************
EOF
fi

if [[ -z "${ALLOT_ADMIN_TOKEN:-}" ]]; then
    export ALLOT_ADMIN_TOKEN=dev-admin-token
    echo "run: ALLOT_ADMIN_TOKEN was not set; using the development token: ${ALLOT_ADMIN_TOKEN}" >&2
else
    echo "run: using ALLOT_ADMIN_TOKEN from the environment" >&2
fi

host="${ALLOT_HOST:-127.0.0.1}"
port="${ALLOT_PORT:-8080}"
workers="${ALLOT_WORKERS:-2}"

allot migrate
# A Redis that lost data the ledger has (restarted without persistence, say) refuses those rounds
# until rebuilt; in development, rebuild them at once (only those: the others are left alone).
allot rebuild --wait 5 >/dev/null || echo "run: some round could not be rebuilt (see above)" >&2
allot demo

shown_host="$host"
if [[ "$host" == "0.0.0.0" || "$host" == "::" ]]; then
    shown_host=127.0.0.1
elif [[ "$host" == *:* ]]; then
    shown_host="[$host]"
fi
echo "run: open http://${shown_host}:${port}/  (Ctrl-C stops)" >&2
echo "run: metrics, health and readiness on http://${ALLOT_OPS_HOST:-127.0.0.1}:${ALLOT_OPS_PORT:-9180}/metrics" >&2
exec allot serve --host "$host" --port "$port" --workers "$workers"
