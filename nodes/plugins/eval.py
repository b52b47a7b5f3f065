"""eval: a disk served by shell snippets given as params, one per method (nbdkit-eval-plugin).

Each `METHOD=SCRIPT` param is the script of that method, run by /bin/sh as `SCRIPT METHOD
ARGS...` with the arguments, exit statuses, `$tmpdir` and thread models of the sh kind (see
`nbdfabric kinds sh`): `get_size='echo 64M'`, `pread='dd if=/dev/zero count=$3
iflag=count_bytes'`. Unlike sh, a can_* method need not be written when its method is:
`pwrite=` alone makes the export writable (can_write, can_flush, can_trim, can_zero,
can_extents exit 0 and can_cache prints native for pwrite, flush, trim, zero, extents and
cache). Methods not given run `missing` (default `exit 2`: nbdkit's default for the method).
There is no `load` or `magic_config_key`; `dump_plugin` is never run (no --dump-plugin);
`after_fork` runs once, before the node serves. The scripts are files in `$tmpdir`, named after
their methods.

Params: one per method, named as nbdkit names them (after_fork, block_size, cache, can_cache,
can_extents, can_fast_zero, can_flush, can_fua, can_multi_conn, can_trim, can_write, can_zero,
close, config, config_complete, default_export, dump_plugin, export_description, extents,
flush, get_ready, get_size, is_rotational, list_exports, open, pread, preconnect, pwrite,
thread_model, trim, unload, zero; `nbdfabric kinds eval` shows them with dashes, which are
taken too), `missing`, `script-timeout` (default 60s; 0 none, as nbdkit), and any other
`key=value`: passed to the `config` script (without one, such a key is refused at start).

Example: a 64M read-only disk of zeros,
`nbdfabric node eval get_size='echo 64M' pread='dd if=/dev/zero count=$3 iflag=count_bytes'
--listen unix:/tmp/eval.sock`.

Differences from nbdkit 1.32: those of the sh kind (a script-timeout; exports opened at lookup;
block_size enforced).
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import create_model, model_validator

from ..params import BARE, param
from ..registry import register
from ._script import ScriptParams, ScriptPlugin

#: The methods eval takes a script for (nbdkit-eval-plugin(1)).
METHODS = (
    "after_fork", "block_size", "cache", "can_cache", "can_extents", "can_fast_zero",
    "can_flush", "can_fua", "can_multi_conn", "can_trim", "can_write", "can_zero", "close",
    "config", "config_complete", "default_export", "dump_plugin", "export_description",
    "extents", "flush", "get_ready", "get_size", "is_rotational", "list_exports", "open",
    "pread", "preconnect", "pwrite", "thread_model", "trim", "unload", "zero",
)  # fmt: skip
#: A can_* method not given, for a method that is: the script written for it.
IMPLIED = {
    "can_write": ("pwrite", "exit 0\n"),
    "can_flush": ("flush", "exit 0\n"),
    "can_trim": ("trim", "exit 0\n"),
    "can_zero": ("zero", "exit 0\n"),
    "can_extents": ("extents", "exit 0\n"),
    "can_cache": ("cache", "echo native\n"),
}


class _EvalBase(ScriptParams):
    @model_validator(mode="before")
    @classmethod
    def _no_bare_words(cls, data: Any) -> Any:
        if isinstance(data, dict) and BARE in data:
            given = data[BARE]
            word = given[0] if isinstance(given, list) and given else given
            raise ValueError(f"expected KEY=VALUE, got {word!r}")
        return data


EvalParams: type[ScriptParams] = create_model(  # type: ignore[call-overload]
    "EvalParams",
    __base__=_EvalBase,
    **{m: (str | None, param(None, f"the script of {m}")) for m in METHODS},
    missing=(str, param("exit 2", "the script of every method not given")),
)


@register
class Eval(ScriptPlugin):
    """A disk served by shell snippets given as params (nbdkit's eval plugin)."""

    kind = "eval"
    Params = EvalParams
    no_config = "no config script was given to take it (nor a missing= that does)"

    def __init__(self, params: ScriptParams) -> None:
        super().__init__(params)
        self.given: set[str] = set()

    def method_argv(self, method: str) -> list[str]:
        name = method if method in self.given else "missing"
        return ["/bin/sh", os.path.join(self.tmpdir, name), method]

    async def load(self) -> None:
        self.write_scripts()

    def write_scripts(self) -> None:
        """Each method's script a file in $tmpdir named after it, as nbdkit writes them."""
        scripts = {m: getattr(self.params, m) for m in METHODS}
        scripts = {m: text for m, text in scripts.items() if text is not None}
        for can, (method, text) in IMPLIED.items():
            if can not in scripts and method in scripts:
                scripts[can] = text
        scripts["missing"] = getattr(self.params, "missing")  # noqa: B009 (a created model)
        for method, text in scripts.items():
            path = os.path.join(self.tmpdir, method)
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o500)
        self.given = set(scripts)
