#!/usr/bin/env bash
# Build the nbdfabric image (compose/Dockerfile) from local material: the base image is made by
# compose/build-base.sh when there is no registry, Python packages come from a wheelhouse built
# here, so `docker build` needs no network. Quick when nothing changed: the image carries a hash
# of its inputs (label nbdfabric.inputs) and is rebuilt only when that hash changes.
#
#   scripts/build-image.sh [--tag TAG] [--base IMAGE] [--force]
#     --tag   image to build (default $NBDFABRIC_IMAGE or nbdfabric:latest)
#     --base  FROM image (default nbdfabric-base:bookworm, made locally; an ordinary Debian
#             base such as debian:bookworm-slim must already be there or be pullable)
#   env NBDFABRIC_PYTHON: the project's venv python (default .venv/bin/python; a git worktree
#             without a .venv of its own names the main one's)
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${NBDFABRIC_IMAGE:-nbdfabric:latest}
LOCAL_BASE=nbdfabric-base:bookworm
BASE=$LOCAL_BASE
FORCE=0
while (($#)); do
    case $1 in
        --tag) TAG=$2; shift 2 ;;
        --base) BASE=$2; shift 2 ;;
        --force) FORCE=1; shift ;;
        *) echo "usage: $0 [--tag TAG] [--base IMAGE] [--force]" >&2; exit 2 ;;
    esac
done
PY=${NBDFABRIC_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "build-image: run \`make setup\` first" >&2; exit 1; }

# One build at a time on this machine: `make test` starts one in the background and the docker
# tests ask for the image again; the second waits here, then finds it up to date.
exec 9>"${TMPDIR:-/tmp}/nbdfabric-build-image.lock"
flock 9

if [ "$BASE" = "$LOCAL_BASE" ]; then
    compose/build-base.sh "$BASE"
fi
base_id=$(docker image inspect -f '{{.Id}}' "$BASE" 2>/dev/null || true)
if [ -z "$base_id" ]; then
    echo "build-image: pulling $BASE" >&2
    docker pull -q "$BASE" >/dev/null
    base_id=$(docker image inspect -f '{{.Id}}' "$BASE")
fi

hash_files() { LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum | cut -c1-16; }
deps_key=$(printf '%s\n' pyproject.toml | hash_files)
src_key=$(find nodes orchestrator -type f -name '*.py' -not -path '*/__pycache__/*' \
    | { cat; printf '%s\n' pyproject.toml README.md; } | hash_files)
ctx_key=$(printf '%s\n' compose/Dockerfile compose/.dockerignore compose/healthcheck.py | hash_files)
key=$(printf '%s\n' "$base_id" "$deps_key" "$src_key" "$ctx_key" | sha256sum | cut -c1-16)

have=$(docker image inspect -f '{{index .Config.Labels "nbdfabric.inputs"}}' "$TAG" 2>/dev/null || true)
if [ "$have" = "$key" ] && [ "$FORCE" = 0 ]; then
    echo "build-image: $TAG is up to date"
    exit 0
fi

wh=compose/.wheelhouse
if [ "$(cat "$wh/deps/.key" 2>/dev/null)" != "$deps_key" ]; then
    echo "build-image: wheelhouse for the dependencies"
    rm -rf "$wh/deps" && mkdir -p "$wh/deps"
    "$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        >"$wh/deps/requirements.txt"
    "$PY" -m pip wheel -q --disable-pip-version-check -w "$wh/deps" -r "$wh/deps/requirements.txt"
    echo "$deps_key" >"$wh/deps/.key"
fi
rm -rf "$wh/app" && mkdir -p "$wh/app"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# Build from a copy so that the shared work tree gets no build/ or egg-info churn.
cp -r pyproject.toml README.md nodes orchestrator "$build/"
find "$build" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$wh/app" "$build" \
    >"$build.log" 2>&1 || { cat "$build.log" >&2; rm -f "$build.log"; exit 1; }
rm -f "$build.log"

echo "build-image: docker build $TAG (FROM $BASE)"
# The legacy builder: docker 20.10 without the buildx plugin has no other (BuildKit needs it).
DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$BASE" --label "nbdfabric.inputs=$key" \
    -t "$TAG" -f compose/Dockerfile compose >/dev/null 2>"$build.log" \
    || { cat "$build.log" >&2; rm -f "$build.log"; exit 1; }
rm -f "$build.log"
# The image this one replaced, if any, is now untagged: drop it (only ours carry the label).
docker image prune -f --filter "label=nbdfabric.inputs" >/dev/null
echo "build-image: $TAG ready"
