"""`nbdfabric chain`: an nbdkit command line, served as a chain of node processes.

    nbdfabric chain --filter=cow --filter=delay memory 1G delay-read=10ms --listen unix:/tmp/d.sock

runs a memory node, a delay node over it and a cow node over that, each its own process, and
serves the cow node where the options say: what `nbdkit --filter=cow --filter=delay memory 1G
delay-read=10ms` serves in one process. As in nbdkit, the first --filter is the outermost (the
one clients talk to), a bare word is the plugin's magic param, and each KEY=VALUE goes to
the outermost filter that takes that key, else to the plugin. With `--upstream URI` instead of
a plugin, the filters stand over that NBD server.

The node options (--listen, --run, --print-uri, -r, --tls, --control, ...) are the outermost
node's; --upstream-tls-certificates and --upstream-timeout the innermost filter's. The inner
nodes listen on unix sockets in a private directory and exit with the chain: when the outermost
node exits (its --run command ended, a signal), they are stopped; when one of them exits, the
chain stops and says which. For fabrics with names, supervision and restarts, use a topology
file (`nbdfabric up`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import registry
from .params import CONFIG_KEY, ParamError, field_info, parse_params, passes_on
from .spawn import nbdfabric_command

#: The options that belong to the node reaching the chain's --upstream, not the outermost one.
UPSTREAM_OPTIONS = ("--upstream", "--upstream-tls-certificates", "--upstream-timeout")
#: How long an inner node may take to be ready.
READY_TIMEOUT = 60.0


class ChainError(ValueError):
    """A command line that cannot make a chain; the message says why."""


class Interrupted(Exception):
    """A signal to stop came while the inner nodes were starting."""


@dataclass
class Layer:
    kind: str
    words: list[str] = field(default_factory=list)  #: its params, as the node takes them


@dataclass
class Chain:
    layers: list[Layer]  #: innermost first: the plugin (unless over --upstream), then filters
    outer_options: list[str]  #: the outermost node's options
    upstream_options: list[str]  #: the innermost filter's, with --upstream (may be empty)


def _takes_value(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """Each option string of the node's parser, and whether it is followed by a value."""
    return {
        opt: action.nargs != 0
        for action in parser._actions  # argparse keeps no public table of them
        for opt in action.option_strings
    }


def accepted_keys(kind: str) -> set[str] | None:
    """The KEY=VALUE keys a kind takes (its params and their older spellings), or None for a
    kind that takes any (a script plugin passes unknown keys to its script)."""
    model = registry.get(kind).Params
    if passes_on(model):
        return None
    keys = {entry["name"] for entry in field_info(model)}
    return keys | set(model.spellings)


def parse_chain(argv: Sequence[str], parser: argparse.ArgumentParser) -> Chain:
    """Split a chain's command line into its layers and the options of its two ends."""
    options = _takes_value(parser)
    filters: list[str] = []
    words: list[str] = []
    outer: list[str] = []
    upstream: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        name, eq, inline = arg.partition("=")
        if name == "--filter":
            if not eq:
                if i >= len(args):
                    raise ChainError("--filter needs a filter kind")
                inline, i = args[i], i + 1
            filters.append(inline)
            continue
        if arg == "--":  # the rest are words, even those that begin with -
            words += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            words.append(arg)
            continue
        target = upstream if name in UPSTREAM_OPTIONS else outer
        target.append(arg)
        if not eq and options.get(name, False):
            if i >= len(args):
                raise ChainError(f"{name} needs a value")
            target.append(args[i])
            i += 1
    over_upstream = "--upstream" in {a.partition("=")[0] for a in upstream}
    if not filters and over_upstream:
        raise ChainError("--upstream needs at least one --filter to stand over it")
    if upstream and not over_upstream:
        raise ChainError(f"{upstream[0]} goes with --upstream URI")
    for kind in filters:
        if registry.get(kind).role != "filter":
            raise ChainError(
                f"--filter={kind}: {kind} is a {registry.get(kind).role}, not a filter"
            )
    plugin: Layer | None = None
    if not over_upstream:
        if not words:
            raise ChainError("give a plugin (memory 1G, file disk.img, ...) or --upstream URI")
        plugin, words = Layer(words[0]), words[1:]
        if registry.get(plugin.kind).role != "plugin":
            raise ChainError(
                f"{plugin.kind} is a {registry.get(plugin.kind).role}: name it with --filter"
            )
    outside_in = [Layer(kind) for kind in filters]
    for word in words:
        key, eq, _ = word.partition("=")
        if not CONFIG_KEY.fullmatch(key):
            key, eq = word, ""  # `./a=b.img`: a bare word, the plugin's magic param
        taker = next((f for f in outside_in if eq and key in (accepted_keys(f.kind) or ())), None)
        if taker is None:
            if plugin is None:
                takers = ", ".join(f.kind for f in outside_in)
                raise ChainError(f"no filter takes {word!r} ({takers})")
            accepted = accepted_keys(plugin.kind)
            if eq and accepted is not None and key not in accepted:
                names = ", ".join([*(f.kind for f in outside_in), plugin.kind])
                raise ChainError(f"no layer takes '{key}' ({names}; see `nbdfabric kinds KIND`)")
            taker = plugin
        taker.words.append(word)
    layers = ([plugin] if plugin else []) + outside_in[::-1]
    for layer in layers:  # each checked now, before any process starts
        cls = registry.get(layer.kind)
        try:
            parse_params(layer.kind, cls.Params, layer.words, cls.magic)
        except ParamError as exc:
            raise ChainError(str(exc)) from None
    return Chain(layers, outer, upstream)


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, what: str, stop: list[int]) -> str:
    """The URI of an inner node once its --ready-file is written."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready.exists():
        if stop:
            raise Interrupted
        if proc.poll() is not None:
            raise ChainError(f"{what} exited with status {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise ChainError(f"{what} was not ready within {READY_TIMEOUT:g}s")
        time.sleep(0.02)
    return str(json.loads(ready.read_text())["uri"])


def run_chain(chain: Chain) -> int:
    """Start the inner nodes, run the outermost in the foreground, stop them all after it."""
    node = nbdfabric_command()
    workdir = Path(tempfile.mkdtemp(prefix="nbdfabric-chain-"))
    inner: list[tuple[subprocess.Popen[bytes], str]] = []
    outer: subprocess.Popen[bytes] | None = None
    forwarded: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        if outer is not None and outer.poll() is None:
            outer.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    # Socket activation (LISTEN_FDS) is the outermost node's; the inner ones listen on their own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    try:
        upstream_args = list(chain.upstream_options)
        for n, layer in enumerate(chain.layers[:-1]):
            what = f"layer {n} ({layer.kind})"
            sock, ready = workdir / f"{n}.sock", workdir / f"{n}.json"
            cmd = [*node, "node", layer.kind, *layer.words, "--listen", f"unix:{sock}",
                   "--ready-file", str(ready), "--name", f"{n}-{layer.kind}",
                   "--exit-with-parent", *upstream_args]  # fmt: skip
            # Its own process group: a terminal's ^C reaches the outermost node alone, and
            # the inner ones are stopped after it, outside in, with nothing in flight.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, process_group=0)
            inner.append((proc, what))
            upstream_args = ["--upstream", _wait_ready(proc, ready, what, forwarded)]
        top = chain.layers[-1]
        outer = subprocess.Popen(
            [*node, "node", top.kind, *top.words, *upstream_args, *chain.outer_options]
        )
        return _watch(outer, inner)
    except ChainError as exc:
        print(f"nbdfabric chain: {exc}", file=sys.stderr)
        return 1
    except Interrupted:
        return 128 + forwarded[0]
    finally:
        if outer is not None and outer.poll() is None:
            outer.terminate()
            outer.wait()
        for proc, _ in reversed(inner):  # the layer nearest the client first
            _stop(proc)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(workdir, ignore_errors=True)


def _watch(outer: subprocess.Popen[bytes], inner: list[tuple[subprocess.Popen[bytes], str]]) -> int:
    """Wait for the outermost node; an inner node that exits first stops the chain."""
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return outer.wait(timeout=0.2)
        for proc, what in inner:
            if proc.poll() is not None:
                print(f"nbdfabric chain: {what} exited with status {proc.returncode}; "
                      "stopping the chain", file=sys.stderr)  # fmt: skip
                outer.terminate()
                outer.wait()
                return 1


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cmd_chain(argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        chain = parse_chain(argv, parser)
    except (ChainError, KeyError) as exc:
        print(f"nbdfabric chain: {exc}", file=sys.stderr)
        return 1
    return run_chain(chain)
