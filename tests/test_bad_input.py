"""Bad input at every door: node params and options, topology files, gRPC control.

The project standard: bad input gets a clear error in the protocol's own terms or a readable
message (naming the key, and what it accepts), never a crash, a hang, or lost data. Most cases
are generated: every param of every registered kind gets values of the wrong type, format and
range (in-process through parse_params, the code the command line runs, and a sample through
real `nbdfabric node` processes); topologies are mutated from the valid examples (Hypothesis);
live nodes and the orchestrator get bad Configure/member/shutdown requests and must keep serving.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import ROOT, nbd_connect, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes import registry
from nodes.control.rpc.nbdfabric.v1 import node_pb2 as pb
from nodes.control.rpc.nbdfabric.v1 import node_pb2_grpc as pb_grpc
from nodes.params import ParamError, field_info, parse_params, passes_on
from orchestrator.topology import TopologyError, load, load_text

NBDFABRIC = [sys.executable, "-m", "nodes.cli"]
KINDS = registry.kinds()
#: The least each kind needs to be valid (its required params), as command-line words.
BASE: dict[str, list[str]] = {
    "memory": ["size=1M"],
    "full": ["size=1M"],
    "pattern": ["size=1M"],
    "random": ["size=1M"],
    "sparse-random": ["size=1M"],
    "http": ["url=http://127.0.0.1:9/x"],
    "ssh": ["host=127.0.0.1", "path=disk.img"],
    "partition": ["partition=1"],
    "split": ["file=disk.img"],
    "partitioning": ["file=disk.img"],
    "tmpdisk": ["size=1M"],
    "ondemand": ["size=1M", "dir=."],
    "linuxdisk": ["dir=."],
    "iso": ["dir=."],
    "floppy": ["dir=."],
    "cdi": ["name=my-disk:latest"],
    "sh": ["script=disk.sh"],
    "python": ["script=disk.py"],
    "pause": ["pause-control=pause.ctl"],
    "ext2": ["ext2file=/disk.img"],
}
PARAMS = [(kind, entry) for kind, cls in KINDS.items() for entry in field_info(cls.Params)]
PARAM_IDS = [f"{kind}.{entry['name']}" for kind, entry in PARAMS]

#: Values no param of the type takes (command-line spelling).
BAD_BY_TYPE: dict[str, list[str]] = {
    # Python's int() and float() take `1_0`, other scripts' digits and fullwidth ones.
    "size": [
        "-1",
        "1Q",
        "",
        "1 G B",
        "99999999999E",
        "9" * 5000,
        "nan",
        "1.5.5",
        "0x",
        "½",
        "1_0",
        "\u0663K",
        "\uff11\uff12",
    ],
    "duration": ["-1s", "1fortnight", "", "nan", "inf", "9" * 400, "1e3", "--1", "1_0", "\u0663ms"],
    "rate": ["nan", "-1%", "101%", "1/0", "x", "2", "", "inf%", "1_0%", "\u0663%", "0.1_0"],
    "errno": ["EFOO", "", "E", "5x", "errno", "\u0665"],
    "integer": ["1.5", "", "x", "1e3", "0x", "1_0", "\u0663", "\uff11"],
    "number": ["x", "", "1,5"],
    "boolean": ["maybe", "", "2", "oui"],
}
#: Values of the wrong YAML type (a topology's `params:`), for every typed param.
BAD_YAML_BY_TYPE: dict[str, list[Any]] = {
    "size": [-1, 2**70, float("inf"), float("nan"), [1], {"a": 1}, True],
    "duration": [-1, float("inf"), float("nan"), [1], {"a": 1}, True, 10**400],
    "rate": [float("nan"), -1, 2, [1], True],
    "errno": [-1, 2**70, 0, [1], True, 1.5],
    "integer": [1.5, [1], {"a": 1}, "x"],
    "boolean": [[1], {"a": 1}, "maybe", 2],
}


def _bad_values(entry: dict[str, Any]) -> list[str]:
    t = entry["type"]
    if "|" in t:  # an enum
        return ["bogus", "", t.split("|")[0].upper() + "X", t]
    return BAD_BY_TYPE.get(t, [])


def _words(kind: str, key: str, value: str) -> list[str]:
    return [w for w in BASE.get(kind, []) if not w.startswith(f"{key}=")] + [f"{key}={value}"]


def _parse(kind: str, args: list[str] | dict[str, Any]) -> Any:
    cls = KINDS[kind]
    return parse_params(kind, cls.Params, args, cls.magic)


def _assert_names(message: str, kind: str, key: str) -> None:
    assert key in message, f"{message!r} does not name {key!r}"
    assert message.startswith(f"{kind}:"), f"{message!r} does not name the kind {kind}"
    assert "Traceback" not in message


# -- 1. node params, every kind -----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "entry"), PARAMS, ids=PARAM_IDS)
def test_bad_param_values_are_refused_naming_key_and_type(kind: str, entry: dict[str, Any]):
    key = entry["name"]
    for value in _bad_values(entry):
        with pytest.raises(ParamError) as exc:
            _parse(kind, _words(kind, key, value))
        message = str(exc.value)
        _assert_names(message, kind, key)
        assert f"(accepts {entry['type']})" in message or "required" in message, message
        assert len(message) < 600, f"message of {len(message)} chars: {message[:200]}"
    for yaml_value in BAD_YAML_BY_TYPE.get(entry["type"], []):
        base = dict(w.split("=", 1) for w in BASE.get(kind, []))
        with pytest.raises(ParamError) as exc:
            _parse(kind, {**base, key: yaml_value})
        _assert_names(str(exc.value), kind, key)


#: What a kind needs besides BASE when its other params are given (a check of them together).
NEEDS = {"file": ["file=disk.img"], "tar": ["tar-entry=disk.img"]}


@pytest.mark.parametrize("kind", list(KINDS))
def test_kinds_shows_defaults_the_command_line_takes_back(kind: str, capsys: Any):
    """`nbdfabric kinds KIND`: each default, given back as KEY=VALUE, is the default (it said
    `default None` for params that have none, `default 5` for EIO and `default 5.0`)."""
    from nodes.cli import cmd_kinds

    assert cmd_kinds([kind]) == 0
    shown = re.findall(r"^  ([a-z0-9-]+)=\S+  \((.*)\)$", capsys.readouterr().out, re.M)
    entries = {e["name"]: e for e in field_info(KINDS[kind].Params)}
    assert [name for name, _ in shown] == list(entries)
    for name, flags in shown:
        default = entries[name]["default"]
        if "optional" in flags.split(", "):
            assert default is None, (name, flags)
        said = re.match(r"default (.*?)(, live|, magic)*$", flags)
        if said is None:
            continue
        (text,) = shlex.split(said.group(1))
        needed = [w for w in NEEDS.get(kind, []) if not w.startswith(f"{name}=")]
        got = getattr(_parse(kind, [*needed, *_words(kind, name, text)]), _field(kind, name))
        assert got == default or str(got) == default, (name, text, got, default)


def _field(kind: str, name: str) -> str:
    """The attribute of a kind's params that holds param `name` (its alias)."""
    fields = KINDS[kind].Params.model_fields.items()
    return next(attr for attr, f in fields if (f.alias or attr) == name)


@pytest.mark.parametrize("kind", list(KINDS))
def test_unknown_missing_repeated_and_stray_words(kind: str):
    cls = KINDS[kind]
    base = BASE.get(kind, [])
    if passes_on(cls.Params):  # sh, eval: other keys go to the script's config, in order
        if "command" in cls.Params.model_fields:  # tmpdisk, ondemand: variables of command=
            given = _parse(kind, [*base, "command=true", "no_such_param=1"])
            assert given.model_extra == {"no_such_param": "1"}
        else:
            given = _parse(kind, [*base, "no-such-param=1", "no-such-param=2", "x.y=3"])
            assert given.model_extra == {"no-such-param": ["1", "2"], "x.y": "3"}
    else:
        with pytest.raises(ParamError) as exc:
            _parse(kind, [*base, "no-such-param=1"])
        _assert_names(str(exc.value), kind, "no-such-param")
        assert "accepts:" in str(exc.value)
    for entry in field_info(cls.Params):
        if entry["required"]:
            with pytest.raises(ParamError) as exc:
                _parse(kind, [w for w in base if not w.startswith(entry["name"] + "=")])
            _assert_names(str(exc.value), kind, entry["name"])
            assert "required" in str(exc.value)
        elif not entry["repeat"] and entry["default"] is not None:
            value = str(entry["default"]).lower()
            with pytest.raises(ParamError, match="given twice") as exc:
                _parse(kind, [*base, f"{entry['name']}={value}", f"{entry['name']}={value}"])
            _assert_names(str(exc.value), kind, entry["name"])
    # A bare word is only the first (magic) one, unless the magic param may be given
    # several times (`split a b c`): then each is one more value of it.
    repeats = {e["name"] for e in field_info(cls.Params) if e["repeat"]}
    if kind == "sh":  # for the script's magic_config_key
        assert _parse(kind, [*base, "a=1", "stray"]).model_extra == {"a": "1", "": "stray"}
        return
    if cls.magic in repeats:
        values = getattr(_parse(kind, [*base, "stray"]), _field(kind, cls.magic))
        assert values[-1] == "stray", values
        return
    if cls.magic is None:
        with pytest.raises(ParamError, match="expected KEY=VALUE"):
            _parse(kind, [*base, "stray"])
        return
    # As nbdkit, a bare word anywhere sets the magic param; a second one is refused.
    with pytest.raises(ParamError, match=f"'{cls.magic}' given twice"):
        _parse(kind, [*base, "stray", "stray2"])


def test_a_bare_word_anywhere_is_the_magic_param() -> None:
    """nbdkit(1): the magic key is assumed wherever a word has no `key=` part, and a word
    whose part before '=' is no key (`./a=b.img`) has none."""
    assert _parse("ondemand", ["dir=.", "1G"]).size == 1 << 30
    assert _parse("file", ["cache=none", "./a=b.img"]).file == "./a=b.img"


ODD_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["\udcff", "\x00", "é" * 300, "\u202e", "\uff11\uff27", "٣", " ", "=", "a=b"]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_text_for_any_param_is_taken_or_refused_cleanly(data: st.DataObject):
    """Arbitrary unicode (lone surrogates from undecodable argv bytes included) for any param:
    parse_params returns, or raises ParamError naming the key. Nothing else escapes."""
    kind, entry = data.draw(st.sampled_from(PARAMS))
    value = data.draw(ODD_TEXT)
    try:
        _parse(kind, _words(kind, entry["name"], value))
    except ParamError as exc:
        message = str(exc)
        assert entry["name"] in message or message.startswith(f"{kind}: "), message


YAML_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_yaml_value_for_any_param_is_taken_or_refused_cleanly(data: st.DataObject):
    kind, entry = data.draw(st.sampled_from(PARAMS))
    value = data.draw(YAML_VALUES)
    base = dict(w.split("=", 1) for w in BASE.get(kind, []))
    try:
        params = _parse(kind, {**base, entry["name"]: value})
    except ParamError as exc:
        assert len(str(exc)) < 2000
        return
    got = getattr(params, entry["name"].replace("-", "_"))
    if isinstance(got, float):  # a value taken is a real one: no nan or inf durations/rates
        assert math.isfinite(got), f"{kind} {entry['name']}={value!r} taken as {got}"


#: Kinds whose params can be tried in-process over RAM disks (the rest need files/servers).
IN_PROCESS = [
    k for k in KINDS if k not in ("http", "ssh", "file", "gzip", "xz", "info", "log", "stats")
]
EDGE: dict[str, list[str]] = {
    "size": ["0", "1", "3", "511", "1E", "8E"],
    "integer": ["-1", "0", "1", "2", "100", "99999999999999999999"],
    "duration": ["0", "1e-9"],
    "number": ["-1", "0", "100", "101", "1e308"],
}


async def _try_backend(kind: str, words: list[str]) -> None:
    """Build, start, read 512 bytes and stop a node's backend over RAM disks, in-process."""
    cls = KINDS[kind]
    params = _parse(kind, words)
    mem = KINDS["memory"]

    def disk() -> Any:
        return mem.create(_parse("memory", ["size=1M"]))

    if cls.role == "plugin":
        backend = cls.create(params)
    elif cls.role == "filter":
        backend = cls(params, disk())  # type: ignore[call-arg]
    else:
        backend = cls(params, [disk() for _ in range(max(3, cls.min_members))])  # type: ignore[call-arg]
    await asyncio.wait_for(backend.start(), 10)
    try:
        size = backend.capabilities().size
        if size:
            await asyncio.wait_for(backend.pread(memoryview(bytearray(min(512, size))), 0, 0), 10)
    finally:
        await asyncio.wait_for(backend.stop(), 10)


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_edge_values_are_refused_at_parse_or_start_or_work(kind: str, tmp_path: Path):
    """A value parse_params takes must give a node that starts and reads, or one whose start
    says what is wrong (OSError/ValueError, which `nbdfabric node` prints and exits 1 on);
    never another exception (ZeroDivisionError, OverflowError: a Traceback)."""
    os.chdir(tmp_path)  # state files of fans land here
    failures = []
    for entry in field_info(KINDS[kind].Params):
        if kind == "rate" and entry["type"] == "size":
            continue  # 1 byte/s is a legitimate, very slow node
        for value in EDGE.get(entry["type"], []):
            words = _words(kind, entry["name"], value)
            try:
                asyncio.run(_try_backend(kind, words))
            except (ParamError, OSError, ValueError):
                pass
            except Exception as exc:
                failures.append(f"{kind} {words}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


# -- node processes: the real command line --------------------------------------------------------


def _node(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    res = subprocess.run(
        [*NBDFABRIC, "node", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    res.elapsed = time.monotonic() - start  # type: ignore[attr-defined]
    return res


def _assert_refused(res: subprocess.CompletedProcess[str], codes: tuple[int, ...], *frags: str):
    assert res.returncode in codes, f"exit {res.returncode}: {res.stdout}{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert "[Errno" not in res.stderr, res.stderr  # errors as people read them (run.describe)
    assert "GRPC_VERBOSITY" not in res.stderr and ".cc:" not in res.stderr, res.stderr  # gRPC's
    for frag in frags:
        assert frag in res.stderr, f"{frag!r} not in {res.stderr!r}"


#: A sample of the in-process cases, through real processes: the same message, exit 1.
PROCESS_SAMPLE = [
    ("memory", ["size=1Q"]),
    ("memory", ["-1"]),
    ("memory", []),
    ("delay", ["delay-read=" + "9" * 400]),
    ("error", ["error=EFOO"]),
    ("cache", ["cache=bogus"]),
    ("ip", ["allow=\udcff"]),
    ("retry", ["retries=1.5", "retries=2"]),
    ("mirror", ["bitmap-chunk=0"]),
    ("null", ["nope=1"]),
    ("stripe", ["chunk-size=-1"]),
    ("offset", ["offset=1", "stray"]),
    ("memory", ["szie=1M"]),  # two problems: a missing param and an unknown one
]


@pytest.mark.parametrize(("kind", "words"), PROCESS_SAMPLE, ids=[k for k, _ in PROCESS_SAMPLE])
def test_real_cli_refuses_params_as_in_process(kind: str, words: list[str], tmp_path: Path):
    with pytest.raises(ParamError) as exc:
        _parse(kind, words)
    sock = tmp_path / "n.sock"
    env_words = [os.fsencode(w).decode("utf-8", "surrogateescape") for w in words]
    res = _node(kind, *env_words, "--listen", f"unix:{sock}")
    _assert_refused(res, (1,), *str(exc.value).splitlines())
    assert all(line.startswith("nbdfabric node: ") for line in res.stderr.splitlines()), res.stderr
    assert not sock.exists()


UPSTREAM = "nbd+unix:///?socket=/nonexistent/x.sock"
OTHER = "nbd+unix:///?socket=/nonexistent/y.sock"
OPTION_CASES = [
    (["memory", "1M", "--listen", "no-such-host.invalid:0"], (1,), "no-such-host.invalid"),
    (["memory", "1M", "--listen", "127.0.0.1:99999"], (1,), "out of range"),
    (["memory", "1M", "--listen", "fd:999"], (1,), "fd:999"),
    (["memory", "1M", "--listen", "fd:-1"], (1,), "fd:-1"),
    (["memory", "1M", "--listen", "[::1"], (1,), "unclosed"),
    (["memory", "1M", "--listen", "tcp:127.0.0.1:0"], (1,), "HOST:PORT, without a prefix"),
    (["memory", "1M", "--listen", "unix:"], (1,), "needs a path"),
    (["memory", "1M", "--listen", "unix:/nonexistent/d/x.sock"], (1,), "cannot listen"),
    (["memory", "1M", "--listen", "1:2:3"], (1,), "IPv6"),
    (["memory", "1M", "--upstream", UPSTREAM], (1,), "takes no --upstream"),
    (["cow"], (1,), "exactly one --upstream"),
    (["cow", "--upstream", UPSTREAM, "--upstream", UPSTREAM], (1,), "exactly one"),
    (["mirror", "--upstream", UPSTREAM], (1,), "at least 2"),
    # A fan whose member cannot start says why without "[Errno 113]" in the middle.
    (
        ["stripe", "--upstream", UPSTREAM, "--upstream", OTHER, "--upstream-timeout", "0.2"],
        (1,),
        "did not start: cannot connect to upstream",
    ),
    # The same member twice is refused before any connection.
    (
        ["stripe", "--upstream", UPSTREAM, "--upstream", UPSTREAM],
        (1,),
        "members 0 and 1 are the same export",
    ),
    (["cow", "--upstream", "disk.img"], (1,), "not an NBD URI"),
    (["cow", "--upstream", "http://example.com/x"], (1,), "not an NBD URI"),
    (["cow", "--upstream", "nbd+unix:///"], (1,), "socket="),
    (
        ["cow", "--upstream", "nbd://127.0.0.1:1", "--upstream-timeout", "0.5"],
        (1,),
        "cannot connect to upstream nbd://127.0.0.1:1",
    ),
    (["cow", "--upstream", UPSTREAM, "--upstream-timeout", "nan"], (2,), "upstream-timeout"),
    (["cow", "--upstream", UPSTREAM, "--upstream-timeout", "-1"], (2,), "upstream-timeout"),
    (["cow", "--upstream", UPSTREAM, "--upstream-timeout", "0"], (2,), "upstream-timeout"),
    (["memory", "1M", "--max-connections", "-1"], (2,), "max-connections"),
    (["memory", "1M", "--keepalive-idle", "-1"], (2,), "keepalive-idle"),
    (["memory", "1M", "--keepalive-interval", "0"], (2,), "keepalive-interval"),
    (["memory", "1M", "--keepalive-count", "1000"], (2,), "keepalive-count"),
    (["memory", "1M", "--workers", "abc"], (2,), "whole number"),
    (["memory", "1M", "--workers", "1_0"], (2,), "whole number"),
    (["memory", "1M", "--max-connections", "\u0663"], (2,), "whole number"),
    (["memory", "1M", "--workers", "0"], (2,), "workers"),
    (["memory", "1M", "--poll-max-us", "-5"], (2,), "poll-max-us"),
    (["memory", "1M", "--handshake-limit", "nan"], (2,), "handshake-limit"),
    (["memory", "1M", "--handshake-limit", "-1"], (2,), "handshake-limit"),
    (["memory", "1M", "--ordering", "random"], (2,), "ordering"),
    (["memory", "1M", "--tls", "on"], (1,), "--tls-certificates"),
    (["memory", "1M", "--tls", "maybe"], (2,), "--tls"),
    (["memory", "1M", "--tls", "on", "--tls-certificates", "/nonexistent"], (1,), "/nonexistent"),
    (["memory", "1M", "--export-name", "e" * 5000], (1,), "--export-name"),
    (["memory", "1M", "--control", "127.0.0.1:99999"], (1,), "out of range"),
    (["memory", "1M", "--metrics", "no-such-host.invalid:0"], (1,), "no-such-host.invalid"),
    # Said as for --listen, naming the option (gRPC said "Failed to bind ...; set
    # GRPC_VERBOSITY=debug ...", after a C-core log line; metrics did not say it was metrics).
    (
        ["memory", "1M", "--control", "unix:/nonexistent/d/c.sock"],
        (1,),
        "--control: cannot listen on unix:/nonexistent/d/c.sock: No such file or directory",
    ),
    (["memory", "1M", "--control", "unix:/tmp"], (1,), "--control: cannot listen on unix:/tmp:"),
    (["memory", "1M", "--control", "no-such-host.invalid:0"], (1,), "no-such-host.invalid"),
    (["memory", "1M", "--metrics", "unix:/tmp"], (1,), "--metrics: cannot listen on unix:/tmp:"),
    (["memory", "1M", "--ready-file", "/nonexistent/d/r.json"], (1,), "--ready-file"),
    (["file", "/nonexistent/disk.img"], (1,), "/nonexistent/disk.img: No such file"),
    (
        ["nbd", "--upstream", "nbd+unix:///?socket=/x", "--upstream-timeout", "0.2"],
        (1,),
        "upstream",
    ),
    (["no-such-kind"], (1,), "unknown node kind"),
    (["memroy", "1M"], (1,), "unknown node kind 'memroy', did you mean 'memory'?"),
    (["memory", "szie=1M"], (1,), "unknown parameter 'szie', did you mean 'size'?"),
    ([], (2,), "the following arguments are required: kind\n"),  # not "kind, KEY=VALUE"
]


def test_node_help_explains_every_option():
    """`nbdfabric node --help` is where the README sends people for the full contract: each
    option says what it does (--listen, --upstream, --run, --tls... said nothing)."""
    from nodes.cli import _node_parser

    parser = _node_parser()
    bare = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not bare, f"options without help: {bare}"
    text = parser.format_help()
    forms = ("unix:PATH", "fd:N", "127.0.0.1:10809", "nbd+unix://", "$uri", "magic",
             "NBDFABRIC_LOG", "NBDFABRIC_UNIX_SNDBUF")  # fmt: skip
    for form in forms:
        assert form in text, form


@pytest.mark.parametrize(
    ("args", "codes", "frag"), OPTION_CASES, ids=[str(i) for i in range(len(OPTION_CASES))]
)
def test_bad_node_options(args: list[str], codes: tuple[int, ...], frag: str, tmp_path: Path):
    listen = [] if "--listen" in args or not args else ["--listen", f"unix:{tmp_path}/n.sock"]
    res = _node(*args, *listen, "--run", "true")
    _assert_refused(res, codes, frag)
    assert res.elapsed < 15, f"took {res.elapsed:.1f}s"  # type: ignore[attr-defined]
    assert not list(tmp_path.iterdir()), "left files behind"


def test_no_uri_printed_for_a_node_that_then_fails(tmp_path: Path):
    """--print-uri is what a wrapper waits for: it must not come before a failure that stops
    the node (a --ready-file that cannot be written)."""
    res = _node("memory", "1M", "--listen", f"unix:{tmp_path}/n.sock", "--print-uri",
                "--ready-file", str(tmp_path / "no/such/dir/r.json"), "--run", "true")  # fmt: skip
    _assert_refused(res, (1,), "--ready-file")
    assert res.stdout == ""


# -- 2. topology files ---------------------------------------------------------------------------

ARCH_EXAMPLE = """\
name: demo
nodes:
  disk-a: {kind: memory, params: {size: 1G}}
  disk-b: {kind: file, params: {file: /var/lib/b.img}}
  mirror: {kind: mirror, upstreams: [disk-a, disk-b]}
  slow:   {kind: delay, upstream: mirror, params: {delay-read: 2ms}}
exports:
  vm1: {node: slow, listen: ["unix:/run/nbdfabric/vm1.sock", "127.0.0.1:10809"]}
"""
EXAMPLES = [
    ARCH_EXAMPLE,
    (ROOT / "compose" / "example.yaml").read_text(),
    (ROOT / "compose" / "examples" / "demo.yaml")
    .read_text()
    .replace("${NBDFABRIC_DEMO_DIR:-/tmp}", "/tmp"),
]


def _validate(text: str) -> Any:
    """The topology, or the TopologyError: nothing else may come out."""
    try:
        return load_text(text, "f.yaml", env={})
    except TopologyError as exc:
        for problem in exc.problems:
            assert problem.file == "f.yaml" and problem.message, problem
        assert "Traceback" not in str(exc)
        return exc


def test_examples_are_valid():
    for text in EXAMPLES:
        assert not isinstance(_validate(text), TopologyError), text


WRONG = st.sampled_from(
    [
        None,
        0,
        -1,
        2**70,
        1.5,
        float("nan"),
        "",
        "x",
        "no such thing",
        [],
        ["a"],
        {},
        {"x": 1},
        True,
        "\udcff",
        "unix:",
        "1:2:3",
        "nbd://",
        "http://x/y",
        "a" * 300,
    ]
).map(copy.deepcopy)  # a fresh [] or {} per draw: the mutations add keys into what they set


def _paths(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, (*path, i))


def _set(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    data[path[0]] = _set(data[path[0]], path[1:], value)
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_topologies_are_valid_or_refused_cleanly(data: st.DataObject):
    """Replace any value (or the whole document) by one of the wrong type or a bad one, drop a
    key, add an unknown one: load_text returns a topology or a TopologyError whose every
    problem names the file and says something."""
    doc = yaml.safe_load(data.draw(st.sampled_from(EXAMPLES)))
    paths = list(_paths(doc))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        op = data.draw(st.sampled_from(["set", "drop", "add"]))
        try:
            if op == "set":
                doc = _set(doc, path, data.draw(WRONG))
            elif op == "drop" and path:
                parent = doc
                for part in path[:-1]:
                    parent = parent[part]
                del parent[path[-1]]
            elif op == "add":
                target = doc
                for part in path:
                    target = target[part]
                if isinstance(target, dict):
                    target[data.draw(st.sampled_from(["bogus", "x-ext", "kind", "1"]))] = data.draw(
                        WRONG
                    )
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced the path
    text = yaml.safe_dump(doc, allow_unicode=True) if not _has_surrogate(doc) else repr(doc)
    _validate(text)


def _has_surrogate(doc: Any) -> bool:
    return "\\ud" in json.dumps(doc, default=str)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_text_mutations_are_valid_or_refused_cleanly(data: st.DataObject):
    """Byte-level damage: cut, repeat or insert characters anywhere in a valid file."""
    text = data.draw(st.sampled_from(EXAMPLES))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 20)))
        insert = data.draw(
            st.sampled_from(
                [
                    "",
                    ":",
                    "- ",
                    "{",
                    "}",
                    "[",
                    "&a ",
                    "*a",
                    "!!python/object:os.system ",
                    "\t",
                    "'",
                    '"',
                    "\n  ",
                    "? ",
                    "%YAML 9\n",
                    "\x00",
                    "\udcff",
                    "${X}",
                ]
            )
        )
        text = (
            text[:i] + insert + text[j:]
            if data.draw(st.booleans())
            else text[:i] + text[i:j] * 2 + text[j:]
        )
    _validate(text)


def _bomb(levels: int = 9) -> str:
    lines = [
        "nodes:",
        "  a:",
        "    kind: memory",
        "    params:",
        '      l0: &l0 ["x","x","x","x","x","x","x","x","x"]',
    ]
    for n in range(1, levels):
        lines.append(f"      l{n}: &l{n} [" + ",".join([f"*l{n - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _cycle(a: str, b: str) -> str:
    return f"nodes:\n  {a}: {{kind: cow, upstream: {b}}}\n  {b}: {{kind: cow, upstream: {a}}}\n"


#: (text, what the message must say): targeted mistakes, each named with the node/key.
TOPOLOGY_CASES = [
    ("", "expected a mapping"),
    ("null\n", "expected a mapping"),
    ("[1, 2]\n", "expected a mapping"),
    ("42\n", "expected a mapping"),
    ("---\nname: a\n---\nname: b\n", "YAML syntax error"),
    ("nodes: {a: {kind: memory, params: {size: 1M}}\n", "YAML syntax error"),
    ("nodes:\n\ta: {kind: memory}\n", "YAML syntax error"),
    ("nodes: !!python/object:os.system {}\n", "YAML syntax error"),
    ("nodes: {}\n", "at least one node"),
    ("nodes: {a: {kind: nope}}\n", "nodes.a.kind: unknown kind 'nope'"),
    ("nodes: {a: {kind: memory, params: {size: 1Q}}}\n", "nodes.a.params.size: bad value '1Q'"),
    ("nodes: {a: {kind: memory, params: {size: 1M, sise: 2}}}\n", "nodes.a.params.sise: unknown"),
    ("nodes: {a: {kind: memory}}\n", "nodes.a.params: memory needs parameter 'size'"),
    (
        "nodes: {a: {kind: memory, params: {size: 1M}, colour: red}}\n",
        "nodes.a.colour: unknown field",
    ),
    ("nodes: {a: {kind: memory, params: [size, 1M]}}\n", "nodes.a.params"),
    ("nodes: {a: {kind: memory, params: {size: 1M}, restart: sometimes}}\n", "nodes.a.restart"),
    ("nodes: {a: {kind: memory, params: {size: 1M}, workers: 0}}\n", "nodes.a.workers"),
    ("nodes: {a: {kind: cow, upstream: a}}\n", "nodes.a.upstream: a node cannot be its own"),
    ("nodes: {a: {kind: cow, upstream: b}}\n", "nodes.a.upstream: no node named 'b'"),
    ("nodes: {a: {kind: cow}}\n", "nodes.a: cow is a filter"),
    ("nodes: {a: {kind: cow, upstream: 'http://x/y'}}\n", "not an NBD URI"),
    ("nodes: {a: {kind: mirror, upstreams: [b]}, b: {kind: null}}\n", "at least 2"),
    (
        "nodes: {a: {kind: memory, upstream: b, params: {size: 1M}}, b: {kind: null}}\n",
        "is a plugin",
    ),
    (_cycle("a", "b"), "cycle: a -> b -> a"),
    ("nodes:\n  a: {kind: null}\n  a: {kind: zero}\n", "nodes.a: duplicate key"),
    ("nodes: {'bad name': {kind: null}}\n", "bad node name"),
    (
        "nodes: {a: {kind: null}}\nexports: {e: {node: b, listen: ['unix:/tmp/x.sock']}}\n",
        "exports.e.node: no node named 'b'",
    ),
    (
        "nodes: {a: {kind: null}}\nexports: {e: {node: a, listen: ['127.0.0.1:99999']}}\n",
        "exports.e.listen[0]: '127.0.0.1:99999': port 99999 is out of range",
    ),
    ("nodes: {a: {kind: null}}\nexports: {e: {node: a, listen: []}}\n", "exports.e.listen"),
    ("nodes: {a: {kind: null}}\nexports: {e: {node: a, listen: ['fd:3']}}\n", "fd: addresses"),
    ("nodes: {a: {kind: null}}\nexports: [a]\n", "exports: expected a mapping"),
    ("nodes: {a: {kind: null}}\nbogus: 1\n", "bogus: unknown key"),
    ("name: 'no spaces'\nnodes: {a: {kind: null}}\n", "bad fabric name"),
    ("nodes: {a: {kind: null, params: &p {x: *p}}}\n", "recursive"),
    (
        "nodes: {a: {kind: delay, upstream: b, params: {delay-read: .inf}}, b: {kind: null}}\n",
        "nodes.a.params.delay-read",
    ),
    (
        'nodes: {a: {kind: ip, upstream: b, params: {allow: "\\udcff"}}, b: {kind: null}}\n',
        "nodes.a.params.allow: bad value '\\udcff'",
    ),
    ("nodes: {a: {kind: null, params: {size: " + "9" * 5000 + "}}}\n", "YAML value error"),
    ("nodes: {a: {kind: null, params: {size: '" + "9" * 5000 + "'}}}\n", "..."),
    (
        "nodes: {a: {kind: retry, upstream: b, params: {retry-on: 5}}, b: {kind: null}}\n",
        "nodes.a.params.retry-on",
    ),
    (
        "nodes: {a: {kind: rate, upstream: b, params: {rate: .inf}}, b: {kind: null}}\n",
        "nodes.a.params.rate",
    ),
    (
        "nodes: {a: {kind: error, upstream: b, params: {error: -1}}, b: {kind: null}}\n",
        "nodes.a.params.error",
    ),
    (
        "nodes: {a: {kind: null, params: {x: ${UNSET_VAR_FOR_TEST}}}}\n",
        "variable UNSET_VAR_FOR_TEST is not set",
    ),
    (_bomb(), "expands to more than"),
    ("nodes: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("nodes: {a: {kind: memory, params: {size: 1M}, workers: '1_0'}}\n", "nodes.a.workers"),
    ("nodes: {a: {kind: null, max-restarts: '\u0663'}}\n", "nodes.a.max-restarts"),
]


@pytest.mark.parametrize(
    ("text", "frag"), TOPOLOGY_CASES, ids=[str(i) for i in range(len(TOPOLOGY_CASES))]
)
def test_topology_mistakes_are_named(text: str, frag: str):
    start = time.monotonic()
    try:
        result: Any = load_text(text, "f.yaml", env={} if "${" not in text else os.environ)
    except TopologyError as exc:
        result = exc
    assert time.monotonic() - start < 5
    assert isinstance(result, TopologyError), f"accepted: {text[:200]}"
    assert frag in str(result), str(result)[:1000]
    assert len(str(result)) < 3000


def test_non_utf8_and_huge_files(tmp_path: Path):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: x\nnodes: \x89\xff\n")
    with pytest.raises(TopologyError, match=r"bin.yaml:2: not UTF-8"):
        load(binary)
    directory = tmp_path / "dir.yaml"
    directory.mkdir()
    with pytest.raises(TopologyError, match="cannot read"):
        load(directory)


@pytest.mark.slow
def test_huge_file(tmp_path: Path):
    huge = tmp_path / "huge.yaml"  # 20,000 nodes: slow is fine, wrong is not
    huge.write_text("nodes:\n" + "".join(f"  n{i}: {{kind: nul}}\n" for i in range(20000)))
    start = time.monotonic()
    with pytest.raises(TopologyError) as exc:
        load(huge)
    assert time.monotonic() - start < 60
    assert "nodes.n0.kind: unknown kind 'nul'" in str(exc.value)
    problems = exc.value.problems
    assert len(problems) >= 20000  # every one found, the first 50 shown
    lines = str(exc.value).splitlines()
    assert len(lines) == 51 and lines[-1] == f"... and {len(problems) - 50} more problems"


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [*NBDFABRIC, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


#: A sample of TOPOLOGY_CASES through every command that reads a topology.
CLI_TOPOLOGIES = [0, 5, 9, 10, 17, 21, 23, 33, 41]


@pytest.mark.parametrize("command", ["validate", "graph", "compose", "k8s", "up", "up-docker"])
def test_topology_commands_refuse_bad_files_and_leave_nothing(command: str, tmp_path: Path):
    run_dir = tmp_path / "run"
    docker = command == "up-docker"
    before = _fabric_containers() if docker else []
    for n in CLI_TOPOLOGIES:
        text, frag = TOPOLOGY_CASES[n]
        f = tmp_path / "fabric.yaml"
        f.write_text(text)
        args = [command, str(f)] + (["--detach"] if command == "up" else [])
        if docker:  # refused before any container, network or volume is made
            args = ["up", "--backend", "docker", str(f), "--detach"]
        res = _cli(*args, cwd=tmp_path, env={"NBDFABRIC_RUN_DIR": str(run_dir)})
        assert res.returncode == 1, f"{command} case {n}: exit {res.returncode}: {res.stderr}"
        assert "Traceback" not in res.stderr, res.stderr
        assert "fabric.yaml" in res.stderr and frag in res.stderr, (n, res.stderr)
        assert not res.stdout.strip(), res.stdout
    assert not run_dir.exists() or not any(run_dir.rglob("*")), list(run_dir.rglob("*"))
    assert not _processes_mentioning(str(tmp_path))
    if docker:
        assert _fabric_containers() == before


def _fabric_containers() -> list[str]:
    """Every docker container, network and volume an nbdfabric fabric made (by label)."""
    out = []
    for what in ("ps -a", "network ls", "volume ls"):
        res = subprocess.run(["docker", *what.split(), "-q", "--filter",
                              "label=io.nbdfabric.fabric"], capture_output=True, text=True,
                             timeout=60, check=True)  # fmt: skip
        out += sorted(res.stdout.split())
    return out


def test_up_with_a_node_that_cannot_start_leaves_nothing(tmp_path: Path):
    """Valid YAML, a node that fails at start (its file does not exist): `up` says which node
    and why, and `down` leaves no process, socket or run dir behind."""
    run_dir = tmp_path / "run"
    f = tmp_path / "fabric.yaml"
    f.write_text(
        "name: bad\nnodes:\n  disk: {kind: file, params: {file: /nonexistent/disk.img}, "
        "restart: never}\nexports:\n  e: {node: disk, listen: ['unix:"
        + str(tmp_path)
        + "/e.sock']}\n"
    )
    env = {"NBDFABRIC_RUN_DIR": str(run_dir)}
    try:
        for _ in range(2):
            res = _cli("up", "--detach", str(f), cwd=tmp_path, env=env)
            assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
            assert "node 'disk' exited" in res.stderr and "/nonexistent/disk.img" in res.stderr
        # The log keeps both runs; the message quotes the one that just failed.
        assert res.stderr.count("--- nbdfabric: starting disk") == 1, res.stderr
    finally:
        _cli("down", "-f", str(f), cwd=tmp_path, env=env)
    assert not _processes_mentioning(str(tmp_path))
    assert not (tmp_path / "e.sock").exists()
    leftovers = [p for p in run_dir.rglob("*") if p.suffix not in (".log",) and p.is_file()]
    assert not leftovers, leftovers


# -- 3. gRPC control on live nodes ----------------------------------------------------------------


class Live:
    """Nodes for the gRPC part: two RAM disks, a mirror over them, a delay filter over one."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.disk_a = self.start("a", "memory", "1M")
        self.disk_b = self.start("b", "memory", "1M")
        self.mirror = self.start(
            "m",
            "mirror",
            "--upstream",
            self.disk_a,
            "--upstream",
            self.disk_b,
            "--upstream-timeout",
            "1",
            control=True,
        )
        self.delay = self.start("d", "delay", "--upstream", self.disk_a, control=True)

    def start(self, name: str, *args: str, control: bool = False) -> str:
        sock = self.base / f"{name}.sock"
        ready = self.base / f"{name}.json"
        cmd = [*NBDFABRIC, "node", *args, "--listen", f"unix:{sock}", "--ready-file", str(ready)]
        if control:
            cmd += ["--control", f"unix:{self.base}/{name}c.sock"]
        log = (self.base / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen(cmd, cwd=self.base, stderr=log))
        wait_for(ready.exists, 30, f"node {name}")
        return f"nbd+unix:///?socket={sock}"

    def control(self, name: str) -> str:
        return f"unix:{self.base}/{name}c.sock"

    def stub(self, name: str) -> pb_grpc.NodeServiceStub:
        return pb_grpc.NodeServiceStub(grpc.insecure_channel(self.control(name)))

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(20)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    nodes = Live(tmp_path_factory.mktemp("live"))
    yield nodes
    nodes.stop()


def _reads(uri: str) -> None:
    """The node still serves: a libnbd read of its first 4 KiB."""
    h = nbd_connect(uri)
    try:
        assert len(h.pread(4096, 0)) == 4096
    finally:
        h.shutdown()


def _code(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, timeout=20, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


LIVE_BAD = {
    "delay": BAD_BY_TYPE["duration"],
    "mirror": ["bogus", "", "-1", "1Q"],
}


@pytest.mark.parametrize("node", ["delay", "mirror"])
def test_configure_bad_values_unknown_and_fixed_params(live: Live, node: str):
    stub = live.stub(node[0])
    cls = KINDS[node]
    for entry in field_info(cls.Params):
        key = entry["name"]
        if entry["live"]:
            for value in _bad_values(entry) or LIVE_BAD[node]:
                code, detail = _code(stub.Configure, pb.ConfigureRequest(changes={key: value}))
                if code == grpc.StatusCode.OK:
                    continue  # e.g. an enum's "" or a size's "1" for mirror: a value it takes
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (key, value, code, detail)
                assert key in detail and len(detail) < 600, detail
        else:
            code, detail = _code(stub.Configure, pb.ConfigureRequest(changes={key: "1"}))
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (key, code, detail)
            assert key in detail and "cannot change" in detail
    code, detail = _code(stub.Configure, pb.ConfigureRequest(changes={"no-such": "1"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no-such" in detail
    _reads(live.delay if node == "delay" else live.mirror)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_configure_random_changes(live: Live, data: st.DataObject):
    """Any map of text to text: a proper code, never UNKNOWN/INTERNAL; the node keeps serving."""
    node = data.draw(st.sampled_from(["delay", "mirror"]))
    names = [e["name"] for e in field_info(KINDS[node].Params)]
    keys = st.sampled_from(names) | st.text(max_size=10)
    values = st.sampled_from(
        ["0", "1ms", "bogus", "", "-1", "nan", "1/0", "first", "full"]
    ) | st.text(max_size=10)
    changes = data.draw(st.dictionaries(keys, values, max_size=3))
    changes = {k: v for k, v in changes.items() if _utf8(k) and _utf8(v)}  # proto strings
    code, detail = _code(live.stub(node[0]).Configure, pb.ConfigureRequest(changes=changes))
    assert code in (
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    ), (changes, code, detail)
    if code == grpc.StatusCode.OK and node == "delay":
        stub = live.stub("d")
        reset = {n: "0" for n in names if n.startswith("delay-") and n != "delay-fast-zero"}
        assert _code(stub.Configure, pb.ConfigureRequest(changes=reset))[0] == grpc.StatusCode.OK


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def test_member_calls_out_of_range_wrong_kind_and_bad_uris(live: Live):
    m, d = live.stub("m"), live.stub("d")
    for index in (2, 3, 2**31, 2**32 - 1):
        for call, req in (
            (m.MarkMemberFaulty, pb.MarkMemberFaultyRequest(index=index)),
            (m.TrustMember, pb.TrustMemberRequest(index=index)),
            (m.ReplaceMember, pb.ReplaceMemberRequest(index=index, uri=live.disk_b)),
        ):
            code, detail = _code(call, req)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and f"{index}" in detail, detail
    for uri, frag in (
        ("notauri", "not an NBD URI"),
        ("http://x/y", "not an NBD URI"),
        ("nbd+unix:///", "socket="),
        ("", "give the NBD URI"),
    ):
        start = time.monotonic()
        code, detail = _code(m.ReplaceMember, pb.ReplaceMemberRequest(index=1, uri=uri))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and frag in detail, (uri, code, detail)
        assert time.monotonic() - start < 5
    # Valid but unreachable: refused within the node's --upstream-timeout (1 s), not 30 s.
    start = time.monotonic()
    code, detail = _code(m.ReplaceMember, pb.ReplaceMemberRequest(index=1, uri="nbd://127.0.0.1:1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, detail)
    assert "nbd://127.0.0.1:1" in detail and time.monotonic() - start < 8
    code, detail = _code(m.TrustMember, pb.TrustMemberRequest(index=0))  # not failed
    assert code == grpc.StatusCode.FAILED_PRECONDITION, detail
    for call, req in (
        (d.ListMembers, pb.ListMembersRequest()),
        (d.TrustMember, pb.TrustMemberRequest(index=0)),
        (d.MarkMemberFaulty, pb.MarkMemberFaultyRequest(index=0)),
        (d.ReplaceMember, pb.ReplaceMemberRequest(index=0, uri=live.disk_b)),
        (d.SetRebuild, pb.SetRebuildRequest()),
    ):
        code, detail = _code(call, req)
        assert code == grpc.StatusCode.UNIMPLEMENTED and "not a fan" in detail, detail
    members = m.ListMembers(pb.ListMembersRequest(), timeout=10).members
    assert [x.state for x in members] == ["in_sync", "in_sync"], members
    _reads(live.mirror)
    _reads(live.delay)


def test_shutdown_grace_and_oversized_requests(live: Live):
    d = live.stub("d")
    for grace in (float("nan"), float("inf"), -1.0):
        code, detail = _code(d.Shutdown, pb.ShutdownRequest(grace_seconds=grace))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "grace" in detail, (grace, detail)
    code, _ = _code(d.Configure, pb.ConfigureRequest(changes={"delay-read": "1" * (5 << 20)}))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, detail = _code(d.Configure, pb.ConfigureRequest(changes={"delay-read": "9" * 400}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "finite" in detail, detail
    _reads(live.delay)


def test_calls_while_paused(live: Live):
    d = live.stub("d")
    d.Pause(pb.PauseRequest(), timeout=10)
    try:
        code, detail = _code(d.Configure, pb.ConfigureRequest(changes={"delay-read": "bogus"}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, detail
        assert _code(d.Pause, pb.PauseRequest())[0] == grpc.StatusCode.OK  # twice: fine
        assert d.GetInfo(pb.GetInfoRequest(), timeout=10).state == pb.NODE_STATE_PAUSED
    finally:
        d.Resume(pb.ResumeRequest(), timeout=10)
    assert _code(d.Resume, pb.ResumeRequest())[0] == grpc.StatusCode.OK
    _reads(live.delay)


def _ctl(addr: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NBDFABRIC, "ctl", addr, *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


CTL_CASES = [
    ("d", ["set", "delay-read=bogus"], 1, "delay-read"),
    ("d", ["set", "no-such=1"], 1, "no-such"),
    ("d", ["set", "delay-reed=1ms"], 1, "'delay-reed', did you mean 'delay-read'?"),
    ("d", ["set", "delay-read=1ms", "delay-read=2ms"], 2, "given twice"),
    ("d", ["set", "=1"], 2, "KEY=VALUE"),
    ("d", ["trust", "0"], 1, "not a fan"),
    ("d", ["members"], 1, "not a fan"),
    ("d", ["shutdown", "--grace", "nan"], 2, "grace"),
    ("d", ["--timeout", "nan", "info"], 2, "timeout"),
    ("m", ["replace", "99999999999", "nbd://x"], 2, "INDEX"),
    ("m", ["replace", "x", "nbd://x"], 2, "INDEX"),
    ("m", ["faulty", "-1"], 2, "INDEX"),
    ("m", ["faulty", "\u0661"], 2, "INDEX"),
    ("d", ["--timeout", "1_0", "info"], 2, "timeout"),
    ("m", ["faulty", "7"], 1, "out of range"),
    ("m", ["replace", "1", "notauri"], 1, "not an NBD URI"),
    ("m", ["set", "bitmap-chunk=1K"], 1, "cannot change"),
    ("m", ["rebuild", "--throttle", "-5"], 2, "--throttle"),
    ("m", ["bogus-command"], 2, "invalid choice"),
    # A node that is there but slow to answer is not "cannot reach" (exit 3): the replace
    # waits for its new member (--upstream-timeout 1 s here).
    ("m", ["--timeout", "0.3", "replace", "1", "nbd://127.0.0.1:1/"], 1, "did not answer in time"),
]


@pytest.mark.parametrize(
    ("node", "args", "rc", "frag"), CTL_CASES, ids=[" ".join(a) for _, a, _, _ in CTL_CASES]
)
def test_ctl_cli_prints_errors_without_traceback(
    live: Live, node: str, args: list[str], rc: int, frag: str
):
    res = _ctl(live.control(node), *args)
    assert res.returncode == rc, f"exit {res.returncode}: {res.stderr}"
    assert "Traceback" not in res.stderr and frag in res.stderr, res.stderr
    assert _code(live.stub(node).GetInfo, pb.GetInfoRequest())[0] == grpc.StatusCode.OK


def test_calls_on_a_stopping_node(tmp_path: Path):
    """While a node drains (a 2 s read in flight after Shutdown), Configure and Pause are
    refused as FAILED_PRECONDITION, and the CLI says so; the read still completes."""
    import nbd

    nodes = Live.__new__(Live)
    nodes.base, nodes.procs = tmp_path, []
    disk = nodes.start("a", "memory", "1M")
    slow = nodes.start("s", "delay", "delay-read=2s", "--upstream", disk, control=True)
    stub = nodes.stub("s")
    h = nbd_connect(slow)
    buf = nbd.Buffer(4096)
    cookie = h.aio_pread(buf, 0)
    try:
        time.sleep(0.3)  # the read is in the delay
        stub.Shutdown(pb.ShutdownRequest(grace_seconds=10), timeout=10)
        code, detail = _code(stub.Configure, pb.ConfigureRequest(changes={"delay-read": "0"}))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "shutting down" in detail, detail
        code, detail = _code(stub.Pause, pb.PauseRequest())
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "shutting down" in detail, detail
        res = _ctl(nodes.control("s"), "set", "delay-read=0")
        assert res.returncode == 1 and "shutting down" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        while not h.aio_command_completed(cookie):
            h.poll(1)
    finally:
        h.shutdown()
    assert nodes.procs[1].wait(20) == 0
    nodes.stop()


# -- the orchestrator's gRPC and `set` -----------------------------------------------------------

FABRIC = """\
name: bi
nodes:
  disk: {kind: memory, params: {size: 1M}}
  slow: {kind: delay, upstream: disk}
exports:
  e: {node: slow, listen: ["unix:SOCK"]}
"""


def test_orchestrator_refuses_bad_apply_and_configure(tmp_path: Path):
    from nodes.control.rpc.nbdfabric.v1 import orchestrator_pb2 as opb
    from nodes.control.rpc.nbdfabric.v1 import orchestrator_pb2_grpc as opb_grpc

    env = {"NBDFABRIC_RUN_DIR": str(tmp_path / "r")}
    f = tmp_path / "fabric.yaml"
    sock = tmp_path / "e.sock"
    f.write_text(FABRIC.replace("SOCK", str(sock)))
    res = _cli("up", "--detach", str(f), cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    try:
        stub = opb_grpc.OrchestratorServiceStub(
            grpc.insecure_channel(f"unix:{tmp_path}/r/bi/orchestrator.sock")
        )
        for text, frag in (
            (_bomb(), "expands to more than"),
            ("nodes: [", "YAML syntax"),
            ("nodes: {a: {kind: nope}}", "unknown kind"),
            ("", "mapping"),
            ("nodes: {a: {kind: null, params: &p {x: *p}}}", "recursive"),
        ):
            start = time.monotonic()
            code, detail = _code(stub.Apply, opb.ApplyRequest(topology_yaml=text, source="x.yaml"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and frag in detail, (code, detail)
            assert time.monotonic() - start < 10
        cases = [
            ("nope", {"delay-read": "1ms"}, grpc.StatusCode.NOT_FOUND, "no node named 'nope'"),
            ("slow", {"delay-read": "bogus"}, grpc.StatusCode.INVALID_ARGUMENT, "delay-read"),
            ("slow", {"delay-read": "inf"}, grpc.StatusCode.INVALID_ARGUMENT, "delay-read"),
            ("slow", {"nope": "1"}, grpc.StatusCode.INVALID_ARGUMENT, "nope"),
            ("disk", {"size": "2M"}, grpc.StatusCode.FAILED_PRECONDITION, "cannot change"),
        ]
        for node, changes, want, frag in cases:
            code, detail = _code(
                stub.ConfigureNode, opb.ConfigureNodeRequest(node=node, changes=changes)
            )
            assert code == want and frag in detail, (node, changes, code, detail)
        for args, rc, frag in (
            (["set", "nope", "a=1"], 1, "no node named"),
            (["set", "slow", "delay-read=x"], 1, "delay-read"),
            (["set", "slow", "delay-read=1ms", "delay-read=2ms"], 2, "given twice"),  # usage
        ):
            res = _cli(*args, "-f", str(f), cwd=tmp_path, env=env)
            assert res.returncode == rc and frag in res.stderr, res.stderr
            assert "Traceback" not in res.stderr
        bad = tmp_path / "bad.yaml"
        bad.write_text(FABRIC.replace("delay", "dleay").replace("SOCK", str(sock)))
        res = _cli("up", "--detach", str(bad), cwd=tmp_path, env=env)
        assert res.returncode == 1 and "unknown kind 'dleay'" in res.stderr, res.stderr
        nodes = json.loads(_cli("status", "--json", "-f", str(f), cwd=tmp_path, env=env).stdout)
        assert {n["name"] for n in nodes} == {"disk", "slow"}
        _reads(f"nbd+unix:///e?socket={sock}")
    finally:
        _cli("down", "-f", str(f), cwd=tmp_path, env=env)
    assert not _processes_mentioning(str(tmp_path))
