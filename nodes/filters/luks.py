"""luks: serve the plaintext of a LUKSv1-encrypted disk on the upstream, read and write
(nbdkit-luks-filter).

The upstream holds a LUKSv1 image (as `qemu-img create -f luks` or `cryptsetup luksFormat
--type luks1` make it); clients see the decrypted payload, and what they write is encrypted
before it goes upstream, so the upstream (a file, a web server, another host) only ever holds
ciphertext. At start the node reads the header, tries the passphrase on each enabled key slot
in turn (PBKDF2 as many iterations as the image asks: a second or two per slot for images
made with the tools' defaults), and keeps the master key the first slot that opens gives.

The export is the payload: the upstream's size less the payload offset (whole 512-byte
sectors). Encryption works on whole sectors, so the minimum block size advertised is 512 (or
the upstream's, if larger); a request that is not aligned to it is served all the same, as
nbdkit does: a read reads the sectors around it, a write reads, decrypts, patches, encrypts
and writes back the sectors at its edges, and writes that share a sector wait for each other
so that neither undoes the other. Zeroing writes encrypted zeros (a hole punched in the
ciphertext would read back as garbage): write zeroes is offered and done with ordinary
writes, trim and fast zero are not offered. Block status says everything is data. Flush, FUA
and cache go to the upstream (cache for the sectors around the range).

Cipher specs: AES (128, 192 or 256 bits) in XTS (`aes-xts-plain64`, what qemu-img and
cryptsetup make by default; 128- or 256-bit keys) or CBC, with the `plain`, `plain64` or
`essiv:HASH` IV generator; hashes md5, sha1, sha224, sha256, sha384 and sha512. Anything else
(serpent, twofish, ecb, ctr, LUKS2) is refused at start, the message naming the cipher spec.
Throughput is bounded by the cryptography library's cost of one cipher context per sector
(about 5 µs): nbdcopy through `file` -> `luks` moved 128 MiB at about 120 MiB/s reading and
95 MiB/s writing (nbdkit 1.32, with GnuTLS on several threads: 580 and 130). Large requests
are encrypted in pieces, with other clients served between them.

Params:
- `passphrase` (required, never shown by `ctl info`): the passphrase itself (visible to
  anyone who can list processes), `+FILENAME` (the file's first line, without its newline:
  the secure way), `-FD` (the first line read from file descriptor FD, 3 or more, inherited
  from the parent) or `-` (asked for on the terminal on stdin, without echo; fails if stdin
  is not a terminal; Ctrl-D gives up). The node waits for it: a stop signal meanwhile is
  acted on once the node has started, as during any start.

Example (a LUKS disk image on a web server, decrypted on the way, the server seeing only
ciphertext): `nbdfabric node http https://images.example/disk.luks --listen
unix:/tmp/c.sock`, then `nbdfabric node luks passphrase=+/run/secrets/disk --upstream
'nbd+unix:///?socket=/tmp/c.sock' --listen unix:/tmp/disk.sock`.

Differences from nbdkit 1.32:
- Unaligned writes and zeroes change only the bytes asked for. nbdkit 1.32's garble the rest
  of the sectors they touch, and its unaligned zeroes zero them whole (clients that honour the
  512-byte minimum, as qemu and nbdcopy do, never send such requests).
- The image is opened when the node starts: a wrong passphrase, an image that is not LUKSv1
  or a cipher not served stops the node with exit status 1 and a message. nbdkit opens it for
  each client and, when that fails, logs the message and crashes (SIGSEGV) in the handshake.
- `essiv` IV generators are served (nbdkit refuses them); qemu-img makes them with
  `-o cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256`.
- A payload that ends in part of a sector: the part is left out of the export. nbdkit
  advertises it and aborts (an assertion) when a client reads it; qemu rounds the size up.
- An image whose payload offset equals its size is an empty export (nbdkit refuses it).
- The preferred block size is the upstream's (at least 4K; nbdkit says 512), the maximum the
  upstream's (nbdkit says 4G-1, then refuses requests over 64M).
- A FAST_ZERO request (not advertised) fails with EINVAL; nbdkit 1.32 aborts on one.
- A passphrase longer than 64 KiB (in a file or from a descriptor) is refused, not read on
  without end (`passphrase=+/dev/zero`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

from pydantic import field_validator

from ..base import Backend, Capabilities, Extents, Filter, Holes, Support, read_flat
from ..params import Params, secret
from ..passwords import check_form, read_secret
from ..protocol.constants import CmdFlag
from ..registry import register
from ._blocks import RangeLocks
from ._luks import (
    HEADER_SIZE,
    SECTOR,
    CipherSpec,
    Header,
    KeySlot,
    LuksError,
    SectorCipher,
    parse_header,
    unlock,
)

log = logging.getLogger("nbdfabric.luks")

_FUA = int(CmdFlag.FUA)
#: Bytes encrypted or decrypted between turns of the event loop (about 2.5 ms of work).
CHUNK = 256 * 1024


class LuksParams(Params):
    passphrase: str = secret(
        ...,
        "the passphrase: SECRET, +FILE (its first line), -FD (read from that inherited file "
        "descriptor) or - (asked for on the terminal)",
    )

    @field_validator("passphrase")
    @classmethod
    def _form(cls, value: str) -> str:
        return check_form(value)


def read_passphrase(value: str) -> bytes:
    """The passphrase `passphrase=VALUE` gives (nbdkit's forms); LuksError if it cannot be read."""
    try:
        return read_secret("passphrase", value, "LUKS passphrase: ")
    except ValueError as exc:
        raise LuksError(str(exc)) from None


@register
class Luks(Filter):
    """Serves the decrypted payload of a LUKSv1 image on the upstream, read and write."""

    kind = "luks"
    Params = LuksParams
    params: LuksParams

    def __init__(self, params: LuksParams, next: Backend) -> None:
        super().__init__(params, next)
        self._header: Header | None = None
        self._cipher: SectorCipher | None = None
        self.slot = -1  #: the key slot that opened
        self.unit = SECTOR  #: every upstream request is aligned to this
        self.locks = RangeLocks()  #: units being written
        self.read_modify_writes = 0

    @property
    def header(self) -> Header:
        assert self._header is not None, "used before start"
        return self._header

    @property
    def cipher(self) -> SectorCipher:
        assert self._cipher is not None, "used before start"
        return self._cipher

    # Lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        passphrase = await asyncio.to_thread(read_passphrase, self.params.passphrase)
        await self.next.start()
        up = self.next.capabilities()
        self.unit = max(SECTOR, up.block_min)
        head = await self._read_file(0, min(up.size, HEADER_SIZE), up.size)
        header = parse_header(head, up.size)
        if header.payload_offset % self.unit:
            raise LuksError(
                f"the payload starts at byte {header.payload_offset}, which is not a multiple "
                f"of the upstream's minimum block size {self.unit}: put a blocksize node "
                f"(minblock=512) in between"
            )
        materials = [
            await self._read_file(slot.key_offset, header.material_size(slot), up.size)
            for slot in header.slots
        ]
        opened = await asyncio.to_thread(_open_slots, header, passphrase, materials)
        if opened is None:
            tried = ", ".join(str(s.index) for s in header.slots)
            raise LuksError(
                f"the passphrase is not correct: no key slot could be unlocked (tried {tried})"
            )
        slot, master = opened
        self._cipher = SectorCipher(CipherSpec.of(header), master)
        self._header, self.slot = header, slot.index
        log.info(
            "luks: %s, %s, %d-bit key, payload at byte %d (%d bytes); opened key slot %d",
            header.cipher_spec, header.hash_spec, header.key_bytes * 8,
            header.payload_offset, self._size(up), slot.index,
        )  # fmt: skip

    async def _read_file(self, offset: int, length: int, size: int) -> bytes:
        """Bytes of the image, read in requests aligned to the upstream's minimum block."""
        if length <= 0:
            return b""  # an empty upstream: parse_header says so
        begin = offset - offset % self.unit
        end = min(size, -(-(offset + length) // self.unit) * self.unit)
        view = memoryview(bytearray(end - begin))
        await read_flat(self.next, view, begin)
        return bytes(view[offset - begin : offset - begin + length])

    # Facts ----------------------------------------------------------------------------------

    def _size(self, up: Capabilities) -> int:
        n = max(0, up.size - self.header.payload_offset)
        return n - n % SECTOR

    def capabilities(self) -> Capabilities:
        up = self.next.capabilities()
        return Capabilities(
            size=self._size(up),
            writable=up.writable,
            flush=up.flush,
            fua=up.fua,
            zero=Support.EMULATE,  # encrypted zeros, written by the session
            cache=up.cache,
            multi_conn=up.multi_conn,
            rotational=up.rotational,
            block_min=self.unit,
            block_preferred=max(self.unit, up.block_preferred or 4096),
            block_max=up.block_max,
            enforce_block_size=False,  # unaligned requests are served (read-modify-write)
        ).normalized()

    def status(self) -> dict[str, Any]:
        header = self._header
        if header is None:
            return self.next.status()
        return {
            **self.next.status(),
            "luks": {
                "cipher": header.cipher_spec,
                "hash": header.hash_spec,
                "key_bits": header.key_bytes * 8,
                "payload_offset": header.payload_offset,
                "uuid": header.uuid,
                "key_slots": [s.index for s in header.slots],
                "opened_slot": self.slot,
            },
            "read_modify_writes": self.read_modify_writes,
        }

    # Data -----------------------------------------------------------------------------------

    def _span(self, offset: int, end: int) -> tuple[int, int]:
        """The unit-aligned range around [offset, end) (cut at the export's end)."""
        unit = self.unit
        size = self._size(self.next.capabilities())
        return offset - offset % unit, min(-(-end // unit) * unit, size)

    async def _crypt(self, data: memoryview, at: int, out: memoryview, decrypt: bool) -> None:
        """Whole sectors of the export from offset `at`, in pieces with turns of the loop
        between them."""
        cipher, first = self.cipher, at // SECTOR
        run = cipher.decrypt if decrypt else cipher.encrypt
        for pos in range(0, len(data), CHUNK):
            if pos:
                await asyncio.sleep(0)
            n = min(CHUNK, len(data) - pos)
            run(data[pos : pos + n], first + pos // SECTOR, out[pos : pos + n])

    async def _read_plain(self, view: memoryview, at: int) -> None:
        await read_flat(self.next, view, self.header.payload_offset + at)
        await self._crypt(view, at, view, decrypt=True)

    async def pread(self, buf: memoryview, offset: int, flags: int) -> Holes:
        end = offset + len(buf)
        lo, hi = self._span(offset, end)
        if lo == offset and hi == end:
            await self._read_plain(buf, offset)
            return None
        plain = memoryview(bytearray(hi - lo))
        await self._read_plain(plain, lo)
        buf[:] = plain[offset - lo : end - lo]
        return None

    async def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        end, unit = offset + len(buf), self.unit
        lo, hi = self._span(offset, end)
        out = memoryview(bytearray(hi - lo))
        async with self.locks.hold(lo // unit, -(-hi // unit)):
            if lo == offset and hi == end:
                await self._crypt(buf, lo, out, decrypt=False)  # never in place: the session's
            else:
                await self._patch(out, lo, hi, buf, offset)
                await self._crypt(out, lo, out, decrypt=False)
            await self.next.pwrite(out, self.header.payload_offset + lo, flags & _FUA)

    async def _patch(self, plain: memoryview, lo: int, hi: int, buf: memoryview, at: int) -> None:
        """`plain` (the units [lo, hi)) as they will be: the edge units that `buf` (at `at`)
        covers only in part read and decrypted, then `buf` copied in."""
        end, unit = at + len(buf), self.unit
        if at > lo:
            first_end = min(lo + unit, hi)
            await self._read_plain(plain[: first_end - lo], lo)
        last = (end - 1) - (end - 1) % unit
        if end < hi and not (last == lo and at > lo):
            await self._read_plain(plain[last - lo :], last)
        plain[at - lo : end - lo] = buf
        self.read_modify_writes += 1

    async def zero(self, count: int, offset: int, flags: int) -> None:
        # Not offered natively (capabilities: EMULATE), so the session writes zeros instead; a
        # zero passed upstream would leave ciphertext zeros, which decrypt to garbage.
        raise OSError(errno.ENOTSUP, "luks: zeroing is done by writing encrypted zeros")

    async def trim(self, count: int, offset: int, flags: int) -> None:
        raise OSError(errno.EINVAL, "luks: trim is not supported")

    async def cache(self, count: int, offset: int, flags: int) -> None:
        lo, hi = self._span(offset, offset + count)
        if hi > lo:
            await self.next.cache(hi - lo, self.header.payload_offset + lo, 0)

    async def extents(self, count: int, offset: int, flags: int) -> Extents:
        return [(count, 0)]  # ciphertext's holes are not the plaintext's: all data


def _open_slots(
    header: Header, passphrase: bytes, materials: list[bytes]
) -> tuple[KeySlot, bytes] | None:
    """The first enabled slot the passphrase opens, and the master key; None if none does."""
    for slot, material in zip(header.slots, materials, strict=True):
        master = unlock(header, slot, passphrase, material)
        if master is not None:
            return slot, master
    return None
