"""cdi: one layer of a container image, served read-only (nbdkit-cdi-plugin).

A KubeVirt "containerDisk" (what CDI, the Containerized Data Importer, imports from a registry)
is a container image of one layer, typically `FROM scratch` and `ADD disk.img /disk/`, whose
disk image (raw or qcow2) sits at /disk/ in that layer. As nbdkit's plugin, this node exports
the whole layer, an uncompressed tar archive, as it is: put a `tar` node over it
(`tar-entry=disk/disk.img`) for the disk image alone, and a `qcow2dec` node over that when the
image is qcow2 (the bytes are never converted: a qcow2 disk is served as qcow2 bytes).

At start the node takes the image from the local docker engine (DOCKER_HOST, as the docker
CLI), streams `docker save` of it (a docker-archive tar, read with the docker Python SDK)
into a folder of its own in $TMPDIR (default /var/tmp, as nbdkit), keeps the layer asked for
(runs of zeros left as holes: a sparse disk stays sparse on disk, and the archive is never
held in memory), opens it and unlinks it: nothing is left in $TMPDIR once the node serves,
even if it is killed. The export is read-only (nbdkit's plugin has no write method: writes
fail with EPERM), multi-conn is offered (every client reads the same bytes), cache is
posix_fadvise and extents are the temporary file's holes. The node's status lists the layer's
entries under disk/ (the names to give `tar-entry=`); a layer with none is served all the same,
with a warning in the log. In a container (compose, Kubernetes) the node reaches the engine
only if it is given its socket (DOCKER_HOST, or /var/run/docker.sock mounted).

Params:
- `name` (magic; required): the image, `NAME[:TAG|@DIGEST]`, as docker names it (an image id
  too). nbdkit's transport prefix `docker://` is taken and dropped; `docker-daemon:` (podman's
  name for the local engine) too.
- `layer` (default 0, the first layer, as nbdkit): which layer, counted from 0 in the order the
  image's manifest lists them (the base first); a negative N counts from the last (-1: the
  last), as nbdkit's jq index does.

Pulling: nbdkit runs `podman pull NAME` every time. Here an image the engine has is used as it
is, never pulled; one it lacks is pulled only when its name starts with a registry host
(`quay.io/org/disk:tag`, `localhost:5000/disk`: a first part with a dot or a colon, or
`localhost`); any other name missing locally stops the node with a message (so that a typo
never reaches docker.io, and tests never reach a registry).

Differences from nbdkit 1.32, deliberate: the docker engine instead of podman and jq (neither is
installed here, so no differential test runs nbdkit's own pull; the tests run nbdkit with a
`podman` shim that saves the same image from docker to compare the layers served). A missing
image, a `layer` out of range (the message says how many there are), an engine that cannot be
reached: exit 1 with a message at start, as nbdkit fails in get_ready. The temporary layer is
sparse and its holes are reported as extents (nbdkit's copy, also unlinked while it serves,
holds every zero, and it reports all data). A stop signal while the image is being saved is
acted on once the node serves (the copy is finished first, then removed); a node killed
(SIGKILL) in that window leaves its folder in $TMPDIR, as nbdkit killed during its `podman
save` leaves its $TMPDIR/imageXXXXXX.d.

Example (a containerDisk's qcow2 image as a raw disk, as nbdkit's manual does with its tar
filter): `nbdfabric chain -U /tmp/vm.sock --filter=qcow2dec --filter=tar cdi my-vm-disk:latest
tar-entry=disk/disk.qcow2`; or the layer alone: `nbdfabric node cdi my-vm-disk:latest --listen
unix:/tmp/layer.sock`, then `nbdcopy 'nbd+unix:///?socket=/tmp/layer.sock' - | tar t` lists
disk/ and disk/disk.qcow2. An image built `FROM` a base image has the disk in its last layer:
`layer=-1`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
import tarfile
import threading
from collections.abc import Iterator
from typing import IO, Any

from pydantic import field_validator

from ..params import Params, param
from ..registry import register
from ._mkdisk import MadeImage

log = logging.getLogger("nbdfabric.cdi")

#: nbdkit's transport prefixes that mean what this node does anyway (the docker engine's image).
TRANSPORTS = ("docker://", "docker-daemon:")
#: How much of the archive is read at a time (bounded memory whatever the image's size).
CHUNK = 1 << 20
#: Runs of zeros this long (and aligned) are left as holes in the temporary layer.
HOLE = 64 << 10
_ZEROS = bytes(HOLE)
#: Where a containerDisk keeps its disk image, in a layer's tar names.
DISK_DIR = "disk/"


class CdiParams(Params):
    name: str = param(
        description="the container image: NAME[:TAG|@DIGEST] in the local docker engine "
        "(pulled only if missing and NAME starts with a registry host)"
    )
    layer: int = param(
        0, description="which layer to export, from 0 (the base); negative counts from the last"
    )

    @field_validator("name")
    @classmethod
    def _an_image(cls, value: str) -> str:
        image_name(value)
        return value


def image_name(text: str) -> str:
    """The docker name of `text`, nbdkit's transport prefixes dropped; ValueError (the reason)
    if empty or of another transport."""
    for prefix in TRANSPORTS:
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    else:
        transport = text.split(":", 1)[0]
        if transport in ("oci", "oci-archive", "dir", "docker-archive", "containers-storage"):
            raise ValueError(
                f"the {transport}: transport is not served (only images of the docker "
                "engine: NAME[:TAG|@DIGEST])"
            )
    if not text or text != text.strip() or "\x00" in text:
        raise ValueError("expected an image, NAME[:TAG|@DIGEST]")
    return text


def has_registry(name: str) -> bool:
    """Whether `name` starts with a registry host (docker's rule: the first part of a name
    with several holds a dot or a colon, or is localhost)."""
    first, slash, _ = name.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


def layer_index(layer: int, count: int, name: str) -> int:
    """`layer` (negative: from the last) as an index into `count` layers; ValueError if out
    of range."""
    index = layer + count if layer < 0 else layer
    if not 0 <= index < count:
        raise ValueError(
            f"bad value '{layer}' for 'layer': image {name} has {count} "
            f"layer{'s' if count != 1 else ''} (layer=0 to {count - 1}, or -{count} to -1 "
            "from the last)"
        )
    return index


class ChunkReader:
    """A file-like read() over an iterator of byte chunks (the saved archive, streamed)."""

    def __init__(self, chunks: Iterator[bytes], stop: threading.Event) -> None:
        self.chunks = chunks
        self.stop = stop
        self.buffer = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while size < 0 or len(out) < size:
            if not self.buffer:
                if self.stop.is_set():
                    raise OSError("the node is stopping")
                chunk = next(self.chunks, b"")
                if not chunk:
                    break
                self.buffer = memoryview(chunk)
            n = len(self.buffer) if size < 0 else min(size - len(out), len(self.buffer))
            out += self.buffer[:n]
            self.buffer = self.buffer[n:]
        return bytes(out)


def copy_sparse(source: IO[bytes], path: str) -> None:
    """`source` into a new file at `path`, aligned runs of HOLE zeros left as holes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while chunk := source.read(CHUNK):
            view = memoryview(chunk)
            for at in range(0, len(view), HOLE):
                block = view[at : at + HOLE]
                if block != _ZEROS[: len(block)]:
                    os.pwrite(fd, block, offset + at)
            offset += len(chunk)
        os.ftruncate(fd, offset)  # a trailing hole
    finally:
        os.close(fd)


def unpack_archive(reader: ChunkReader, folder: str) -> dict[str, str]:
    """Every regular member of the docker-archive read from `reader`, each written to a file
    of `folder`: the paths by member name (links resolved to their target's file)."""
    files: dict[str, str] = {}
    links: dict[str, str] = {}
    with tarfile.open(fileobj=reader, mode="r|") as archive:  # type: ignore[call-overload]
        for n, member in enumerate(archive):
            name = posixpath.normpath(member.name)
            if member.isfile():
                source = archive.extractfile(member)
                assert source is not None
                files[name] = os.path.join(folder, f"m{n}")
                copy_sparse(source, files[name])
            elif member.issym():  # a layer shared by two entries (older docker save)
                links[name] = posixpath.normpath(
                    posixpath.join(posixpath.dirname(name), member.linkname)
                )
            elif member.islnk():
                links[name] = posixpath.normpath(member.linkname)
    for name, target in links.items():
        for _ in range(16):  # a chain of links; a loop stays unresolved
            if target not in links:
                break
            target = links[target]
        if target in files:
            files[name] = files[target]
    return files


def manifest_layers(files: dict[str, str]) -> list[str]:
    """The layers' member names, in order, from the archive's manifest.json."""
    try:
        with open(files["manifest.json"], "rb") as f:
            manifest = json.load(f)
        layers = manifest[0]["Layers"]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"the saved image has no readable manifest.json ({exc})") from None
    return [posixpath.normpath(str(x)) for x in layers]


def disk_entries(path: str) -> list[str]:
    """The names under disk/ in the layer tar at `path` (headers only); [] if it is none."""
    try:
        with tarfile.open(path, mode="r:") as layer:
            return [
                m.name
                for m in layer.getmembers()
                if m.name.removeprefix("./").startswith(DISK_DIR) and not m.isdir()
            ]
    except (tarfile.TarError, OSError):
        return []


@register
class Cdi(MadeImage):
    """A layer of a container image of the local docker engine (a KubeVirt containerDisk)."""

    kind = "cdi"
    Params = CdiParams
    magic = "name"
    params: CdiParams

    def __init__(self, params: CdiParams) -> None:
        super().__init__(params)
        self.name = ""
        self.image_id = ""
        self.layers = 0
        self.index = 0
        self.disks: list[str] = []

    async def check(self) -> None:
        self.name = image_name(self.params.name)

    async def make(self) -> None:
        stop = threading.Event()
        try:
            await asyncio.to_thread(self._save, stop)
        except BaseException:
            stop.set()  # a thread left behind ends at its next chunk
            raise
        self.disks = disk_entries(self.image)
        if not self.disks:
            log.warning(
                "cdi: layer %d of %s holds nothing under /disk (a KubeVirt containerDisk keeps "
                "its image there): serving the layer as it is",
                self.index,
                self.name,
            )

    def _save(self, stop: threading.Event) -> None:
        try:
            import docker
            import docker.errors
            import requests
        except ImportError:
            raise ValueError("the cdi kind needs the docker Python SDK (pip docker)") from None
        try:
            client = docker.from_env()
        except docker.errors.DockerException as exc:
            raise ValueError(f"no docker engine to take {self.name} from: {exc}") from None
        try:
            image = self._local_image(client)
            self.image_id = image.id or ""
            self.layers = len(image.attrs.get("RootFS", {}).get("Layers") or [])
            self.index = layer_index(self.params.layer, self.layers, self.name)
            folder = os.path.dirname(self.image)
            files = unpack_archive(ChunkReader(iter(image.save(chunk_size=CHUNK)), stop), folder)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise ValueError(f"{self.name}: {_said(exc)}") from None
        except (tarfile.TarError, EOFError) as exc:
            raise ValueError(f"{self.name}: the saved image is not a tar: {exc}") from None
        finally:
            client.close()
        layers = manifest_layers(files)
        self.index = layer_index(self.params.layer, len(layers), self.name)
        found = files.get(layers[self.index])
        if found is None:
            raise ValueError(f"{self.name}: layer {self.index} is missing from the archive")
        os.rename(found, self.image)

    def _local_image(self, client: Any) -> Any:
        """The engine's image of that name, pulled first if missing and the name has a
        registry host."""
        import docker.errors

        try:
            return client.images.get(self.name)
        except docker.errors.ImageNotFound:
            if not has_registry(self.name):
                raise ValueError(
                    f"no image {self.name} in the local docker engine (a name that starts "
                    "with a registry host, such as quay.io/ORG/NAME, is pulled)"
                ) from None
        log.warning("cdi: pulling %s", self.name)
        client.images.pull(self.name)
        return client.images.get(self.name)

    def status(self) -> dict[str, Any]:
        return {
            "image": self.name,
            "id": self.image_id,
            "layer": self.index,
            "layers": self.layers,
            "disk_entries": self.disks,
            "size": self.caps.size,
        }


def _said(exc: Exception) -> str:
    """What the engine said, without the SDK's HTTP wrapping when it has its words."""
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)
