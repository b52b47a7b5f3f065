#!/usr/bin/env bash
# Make the image compose/Dockerfile builds FROM on a machine without a container registry:
# debootstrap a minimal Debian bookworm with nbdfabric's runtime packages, then `docker import` it.
# Skipped when the tag exists and was made from the same package list (label nbdfabric.base-inputs).
#
#   compose/build-base.sh [TAG]          default TAG: nbdfabric-base:bookworm
#
# The mirror is debootstrap's default unless the machine's apt sources name a bookworm one
# (or NBDFABRIC_DEBIAN_MIRROR is set); no mirror host is written here.
set -euo pipefail

TAG=${1:-nbdfabric-base:bookworm}
SUITE=bookworm
PKGS=python3,python3-venv,python3-libnbd,libnbd-bin,qemu-utils,tini,ca-certificates,e2fsprogs,xorriso,dosfstools,mtools
INPUTS=$(printf '%s\n' "v1" "$SUITE" "$PKGS" | sha256sum | cut -c1-16)

have=$(docker image inspect -f '{{index .Config.Labels "nbdfabric.base-inputs"}}' "$TAG" 2>/dev/null || true)
if [ "$have" = "$INPUTS" ]; then
    echo "build-base: $TAG is up to date"
    exit 0
fi

sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
if ! command -v debootstrap >/dev/null && [ ! -x /usr/sbin/debootstrap ]; then
    echo "build-base: installing debootstrap"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq debootstrap >/dev/null
fi

# A bookworm mirror from the machine's apt sources (deb822 or one-line), if there is one.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            /^[[:space:]]*$/ { if (uri && ok) { print uri; exit } uri=""; ok=0; next }
            tolower($1) == "uris:" { uri=$2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) ok=1 }
            END { if (uri && ok) print uri }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '$1 == "deb" && $0 !~ /\[/ && $3 == suite { print $2 }' "$f"
    done
}
mirror=${NBDFABRIC_DEBIAN_MIRROR:-$(apt_mirror | head -n1)}

root=$(mktemp -d /var/tmp/nbdfabric-base.XXXXXX)
trap '$sudo rm -rf "$root"' EXIT
echo "build-base: debootstrap $SUITE into $root ${mirror:+from $mirror}"
$sudo debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$root" ${mirror:+"$mirror"} \
    >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# Smaller image: no package caches or lists (the Dockerfile installs nothing more from apt here).
$sudo rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc \
    "$root"/usr/share/man "$root"/usr/share/locale

echo "build-base: docker import as $TAG"
$sudo tar -C "$root" --numeric-owner -c . | docker import \
    --change "LABEL nbdfabric.base-inputs=$INPUTS" \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "$TAG" >/dev/null
echo "build-base: $TAG ready"
