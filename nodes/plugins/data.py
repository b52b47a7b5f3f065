"""data: a small disk image spelled out in a parameter (nbdkit-data-plugin).

`data=` takes nbdkit's data format (nodes/plugins/data_format.py): bytes, words, strings, offset
moves, groups, repetition, slices, names and `<FILE`; `raw=` takes the bytes of the string
itself and `base64=` a base64 text. The image is the size the data reaches unless `size=` cuts
it short or pads it with zeros. It then behaves as a memory node holding those bytes: writable,
sparse (runs of zeros take no memory), with extents.

Params: `data` (magic) or `raw` or `base64` (exactly one), `size` (optional).

Example: a disk with an MBR boot signature and nothing else:
`nbdfabric node data '@0x1fe 0x55 0xaa' size=1M --listen unix:/tmp/d.sock`.
"""

from __future__ import annotations

import base64 as b64
import binascii
import dataclasses
from typing import Any, Self

from pydantic import model_validator

from ..base import Capabilities
from ..params import Params, Size, param
from ..registry import register
from .data_format import Image, Run, parse
from .memory import Memory, SharedStore, SparseStore

#: Runs of a non-zero byte are written in pieces of this size.
_RUN_PIECE = 1 << 20


class DataParams(Params):
    data: str | None = param(None, description="the image in nbdkit's data format")
    raw: str | None = param(None, description="the image: the bytes of this string")
    base64: str | None = param(None, description="the image, base64-encoded")
    size: Size | None = param(None, description="cut the image short or pad it with zeros")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Self:
        given = [k for k in ("data", "raw", "base64") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of data=, raw= or base64= "
                f"({'none' if not given else ' and '.join(given)} given)"
            )
        return self


@register
class Data(Memory):
    """A small image given inline (nbdkit's data format, raw bytes or base64)."""

    kind = "data"
    Params = DataParams  # type: ignore[assignment]
    magic = "data"
    params: DataParams  # type: ignore[assignment]

    def __init__(self, params: DataParams) -> None:  # type: ignore[override]
        super().__init__(params)  # type: ignore[arg-type]
        self.image = image_of(params)
        self.size = self.image.size if params.size is None else params.size
        self._lay_down(self.store)

    def share(self) -> None:
        self.store = SharedStore(self.size)
        self._lay_down(self.store)

    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities(), size=self.size)

    def status(self) -> dict[str, Any]:
        return {**super().status(), "size": self.size, "data_size": self.image.size}

    def _lay_down(self, store: SparseStore | SharedStore) -> None:
        """Write the image into `store` in the order it was spelled (later bytes win)."""
        for offset, data in self.image.chunks:
            count = data.count if isinstance(data, Run) else len(data)
            count = min(count, self.size - offset)
            if count <= 0:
                continue
            if isinstance(data, Run) or not any(data[:count]):
                value = data.value if isinstance(data, Run) else 0
                if value == 0:
                    store.zero(count, offset, punch=True)
                    continue
                piece = bytes([value]) * min(count, _RUN_PIECE)
                for start in range(0, count, _RUN_PIECE):
                    n = min(_RUN_PIECE, count - start)
                    store.write(memoryview(piece)[:n], offset + start)
            else:
                store.write(memoryview(data)[:count], offset)


def image_of(params: DataParams) -> Image:
    if params.data is not None:
        return parse(params.data)
    if params.raw is not None:
        data = params.raw.encode("utf-8", "surrogateescape")  # the argument's own bytes
    else:
        try:
            data = b64.b64decode(params.base64 or "", validate=True)
        except binascii.Error as exc:
            raise ValueError(f"base64: not valid base64 ({exc})") from None
    return Image([(0, data)], len(data)) if data else Image()
