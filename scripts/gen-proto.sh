#!/usr/bin/env bash
# Generate the Python gRPC code from proto/ into nodes/control/rpc/ (checked in).
# proto/nbdfabric/v1/x.proto becomes nodes/control/rpc/nbdfabric/v1/x_pb2{,_grpc}.py{,i}; the
# generated `from nbdfabric.v1 import ...` lines are rewritten to absolute imports under
# nodes.control.rpc so that nothing needs to be put on sys.path.
# With --check, regenerate into a temp dir and fail if the checked-in files differ.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
out=nodes/control/rpc
pkg=nodes.control.rpc
protos=$(cd proto && find . -name '*.proto' | sed 's|^\./||' | LC_ALL=C sort)
if [ -z "$protos" ]; then echo "gen-proto: no .proto files"; exit 0; fi
# The generated code embeds the generator's version and refuses older runtimes: keep the
# generator pinned (pyproject.toml) so that `--check` gives the same bytes on every machine.
want_tools=$(sed -n 's/.*"grpcio-tools>=\([0-9.]*\),<\([0-9.]*\)".*/\1 \2/p' pyproject.toml)
have_tools=$($PY -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')
if [ -n "$want_tools" ]; then
    read -r lo hi <<<"$want_tools"
    if ! $PY - "$have_tools" "$lo" "$hi" <<'PYEOF'
import sys
v, lo, hi = (tuple(int(x) for x in s.split(".")[:3]) for s in sys.argv[1:])
sys.exit(0 if lo <= v < hi else 1)
PYEOF
    then
        echo "gen-proto: grpcio-tools $have_tools is installed, pyproject.toml wants >=$lo,<$hi;" \
            "run 'make setup'" >&2
        exit 1
    fi
fi
gen() {
    local dest=$1 abs py
    mkdir -p "$dest"
    abs=$(cd "$dest" && pwd)
    py=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
    # shellcheck disable=SC2086
    (cd proto && "$py" -m grpc_tools.protoc -I. --python_out="$abs" --pyi_out="$abs" \
        --grpc_python_out="$abs" $protos)
    # Absolute imports for our own packages (top-level names from proto/, e.g. nbdfabric).
    local tops
    tops=$(cd proto && find . -mindepth 1 -maxdepth 1 -type d | sed 's|^\./||' | LC_ALL=C sort)
    for top in $tops; do
        find "$dest" \( -name '*_pb2.py' -o -name '*_pb2_grpc.py' -o -name '*_pb2.pyi' \) -print0 |
            xargs -0 sed -i -E "s/^from ${top}(\.[A-Za-z0-9_.]+)? import /from ${pkg}.${top}\1 import /"
    done
    find "$dest" -type d | while read -r dir; do
        if [ "$dir" = "$dest" ]; then
            printf '"""Generated gRPC code (scripts/gen-proto.sh from proto/); do not edit."""\n' \
                >"$dir/__init__.py"
        else
            : >"$dir/__init__.py"
        fi
    done
}
if [ "${1:-}" = "--check" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    gen "$tmp"
    if ! diff -r -x __pycache__ "$tmp" "$out" >/dev/null; then
        echo "gen-proto: generated code in $out is stale; run 'make proto'" >&2
        diff -r -x __pycache__ "$tmp" "$out" | head -20 >&2
        exit 1
    fi
    echo "gen-proto: generated code is up to date"
else
    rm -rf "$out"
    gen "$out"
    echo "gen-proto: wrote $out"
fi
