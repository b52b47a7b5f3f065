#!/usr/bin/env bash
# Generate the Python gRPC code from proto/ into nodes/control/rpc/ (checked in).
# With --check, regenerate into a temp dir and fail if the checked-in files differ.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
out=nodes/control/rpc
protos=$(cd proto && find . -name '*.proto' | sort)
if [ -z "$protos" ]; then echo "gen-proto: no .proto files"; exit 0; fi
gen() {
    local dest=$1
    mkdir -p "$dest"
    (cd proto && ../$PY -m grpc_tools.protoc -I. --python_out="../$dest" --pyi_out="../$dest" \
        --grpc_python_out="../$dest" $protos)
}
if [ "${1:-}" = "--check" ]; then
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    gen "$tmp"
    if ! diff -r -x __pycache__ -x __init__.py "$tmp" "$out" >/dev/null; then
        echo "gen-proto: generated code in $out is stale; run 'make proto'" >&2
        diff -r -x __pycache__ -x __init__.py "$tmp" "$out" | head -20 >&2
        exit 1
    fi
    echo "gen-proto: generated code is up to date"
else
    gen "$out"
fi
