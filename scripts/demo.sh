#!/usr/bin/env bash
# `make demo`: bring up compose/examples/demo.yaml on local processes and unix sockets, write
# real data through the export with qemu-img, read it back with nbdcopy over TCP, kill -9 a
# node and read again after the supervisor restarted it, then tear everything down.
# Exits non-zero on any checksum mismatch or failure. Another topology: DEMO_TOPOLOGY=FILE
# (it must export `vm1`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
NBDFABRIC=$ROOT/.venv/bin/nbdfabric
TOPOLOGY=${DEMO_TOPOLOGY:-$ROOT/compose/examples/demo.yaml}
SIZE_MB=${DEMO_SIZE_MB:-32}

work=$(mktemp -d /tmp/nbdfabric-demo.XXXXXX)
export NBDFABRIC_DEMO_DIR=$work NBDFABRIC_RUN_DIR=$work/run
fab() { "$NBDFABRIC" "$@" -f "$TOPOLOGY"; }
cleanup() {
    status=$?
    fab down >/dev/null 2>&1 || true
    rm -rf "$work"
    if [ $status -ne 0 ]; then echo "demo: FAILED (status $status)" >&2; fi
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

# What `status --json` says about the node serving an export: its URIs and pid.
export_field() { # EXPORT unix|tcp|pid|node
    fab status --json | python3 -c '
import json, sys
export, what = sys.argv[1], sys.argv[2]
node = next(n for n in json.load(sys.stdin) if n["export_name"] == export)
if what == "pid": print(node["pid"])
elif what == "node": print(node["name"])
else: print(next(u for u in node["export_uris"] if u.startswith("nbd+unix" if what == "unix" else "nbd://")))
' "$@"
}

step "the topology ($TOPOLOGY)"
"$NBDFABRIC" validate "$TOPOLOGY"
"$NBDFABRIC" graph "$TOPOLOGY"

step "nbdfabric up --detach"
fab up --detach
fab status

unix_uri=$(export_field vm1 unix)
tcp_uri=$(export_field vm1 tcp)

step "write ${SIZE_MB}M of random data with qemu-img ($unix_uri)"
head -c "$((SIZE_MB * 1024 * 1024))" /dev/urandom >"$work/disk.img"
qemu-img convert -n -f raw -O raw "$work/disk.img" "$unix_uri"
nbdinfo "$tcp_uri" | sed -n '1,8p'

step "read it back with nbdcopy ($tcp_uri)"
nbdcopy "$tcp_uri" "$work/back.img"
want=$(sha256sum <"$work/disk.img" | cut -d' ' -f1)
got=$(head -c "$((SIZE_MB * 1024 * 1024))" "$work/back.img" | sha256sum | cut -d' ' -f1)
echo "sent  $want"
echo "read  $got"
[ "$want" = "$got" ] || { echo "demo: checksum mismatch" >&2; exit 1; }

node=$(export_field vm1 node)
pid=$(export_field vm1 pid)
step "kill -9 the exported node '$node' (pid $pid): the supervisor restarts it"
kill -9 "$pid"
for _ in $(seq 600); do
    now=$(export_field vm1 pid 2>/dev/null || echo 0)
    health=$(fab status --json | python3 -c '
import json, sys
print(next(n["health"] for n in json.load(sys.stdin) if n["name"] == sys.argv[1]))' "$node")
    if [ "$now" != 0 ] && [ "$now" != "$pid" ] && [ "$health" = SERVING ]; then break; fi
    sleep 0.1
done
fab status
unix_uri=$(export_field vm1 unix)
nbdcopy "$unix_uri" "$work/again.img"
again=$(head -c "$((SIZE_MB * 1024 * 1024))" "$work/again.img" | sha256sum | cut -d' ' -f1)
echo "read  $again (after the restart)"
[ "$want" = "$again" ] || { echo "demo: checksum mismatch after restart" >&2; exit 1; }

step "supervisor events"
fab logs --events | tail -n 12

step "nbdfabric down"
fab down
left=$(find "$work" -type s | wc -l)
[ "$left" = 0 ] || { echo "demo: $left sockets left behind" >&2; exit 1; }
echo "demo: OK"
