#!/usr/bin/env bash
# Regenerate the top-level docker-compose.yml from compose/example.yaml, or with --check fail
# when it is stale (for `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m nodes.cli compose compose/example.yaml -o docker-compose.yml "$@"
