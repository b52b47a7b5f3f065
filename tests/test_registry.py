"""Every registered node kind has a manual and a test (nbdkit's podwrapper-style check).

The manual is the kind's module docstring (what it does, its params, an example); a test is
any file under tests/ other than this one that names the kind as a quoted string, the way
`start_node("memory", ...)` does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NBDFABRIC, ROOT

from nodes import registry

TESTS = Path(__file__).resolve().parent
KINDS = registry.kinds()


def _test_sources() -> str:
    return "\n".join(
        p.read_text()
        for p in sorted(TESTS.rglob("*.py"))
        if p.resolve() != Path(__file__).resolve()
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_registry_kind_has_a_manual(kind: str) -> None:
    manual = (sys.modules[KINDS[kind].__module__].__doc__ or "").strip()
    assert manual, f"{kind}: its module has no docstring (the kind's manual)"
    assert manual.startswith(kind.split("-")[0]) or kind in manual, (
        f"{kind}: the manual should open with the kind's name"
    )
    assert len(manual.splitlines()) >= 3, (
        f"{kind}: the manual is one line; say what, params, example"
    )
    assert "Example" in manual, f"{kind}: the manual has no example"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_registry_kind_has_a_test(kind: str) -> None:
    quoted = re.compile(rf"""["']{re.escape(kind)}["']""")
    assert quoted.search(_test_sources()), f"{kind}: no test under tests/ names this kind"


def test_registry_lists_the_source_plugins() -> None:
    expected = {"file", "null", "zero", "full", "pattern", "random", "sparse-random", "info"}
    assert expected <= set(KINDS)
    assert all(KINDS[k].role == "plugin" for k in expected)


def test_params_given_twice_are_refused_unless_they_may_be_repeated() -> None:
    from nodes.params import ParamError, field_info, parse_params
    from nodes.plugins.http import HttpParams

    url = "http://h/x"
    with pytest.raises(ParamError, match="parameter 'user' given twice"):
        parse_params("http", HttpParams, [url, "user=a", "user=b"], "url")
    p = parse_params("http", HttpParams, [url, "header=A: 1", "header=B: 2"], "url")
    assert p.header == ["A: 1", "B: 2"]  # type: ignore[attr-defined]
    assert parse_params("http", HttpParams, [url], "url").header == []  # type: ignore[attr-defined]
    # A topology gives one value or a list.
    one = parse_params("http", HttpParams, {"url": url, "header": "A: 1"})
    assert one.header == ["A: 1"]  # type: ignore[attr-defined]
    info = {e["name"]: e for e in field_info(HttpParams)}
    assert info["header"]["repeat"] and info["header"]["type"] == "string"
    assert not info["user"]["repeat"]


def test_kinds_into_a_closed_pipe_stops_quietly() -> None:
    # `nbdfabric kinds | head -1`: the reader is gone before we write (closed before the
    # child has even imported), so the first write hits EPIPE.
    proc = subprocess.Popen(
        [*NBDFABRIC, "kinds"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_params_checked_together_say_what_is_wrong_without_a_key() -> None:
    from nodes.filters.readahead import ReadaheadParams
    from nodes.params import ParamError, parse_params

    args = ["readahead-min=1M", "readahead-max=4K"]
    with pytest.raises(ParamError) as caught:
        parse_params("readahead", ReadaheadParams, args)
    # Not "bad value {...whole dict...} for '?'": the model's own message.
    assert str(caught.value) == "readahead: need 0 < readahead-min <= readahead-max"


def test_bare_command_is_a_usage_error_and_version_is_known() -> None:
    """`nbdfabric` alone: the usage on stderr, exit 2 (it went to stdout); `--version` says
    the version (it was 'unknown command')."""
    bare = subprocess.run(NBDFABRIC, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (bare.returncode, bare.stdout) == (2, "") and "usage:" in bare.stderr
    res = subprocess.run([*NBDFABRIC, "--version"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0 and re.fullmatch(r"nbdfabric \S+\n", res.stdout), res


def test_a_node_imports_only_its_own_kinds_module() -> None:
    """registry.get() imports the module named after the kind, not all fifty (their params
    models took 0.1 s of every node's start); an unknown kind still gets its hint, from all."""
    probe = (
        "import sys; from nodes import registry\n"
        "registry.get('sparse-random'); registry.get('nbd'); registry.get('mirror')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('nodes.plugins.', "
        "'nodes.filters.', 'nodes.fans.')) and not m.rsplit('.', 1)[1].startswith('_')))\n"
        "try:\n    registry.get('sparse_random')\nexcept KeyError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.splitlines()  # fmt: skip
    assert out[0] == "['nodes.fans.mirror', 'nodes.filters.nbd', 'nodes.plugins.sparse_random']"
    assert out[1] == (
        "unknown node kind 'sparse_random', did you mean 'sparse-random'? (see `nbdfabric kinds`)"
    )


@pytest.mark.parametrize(
    ("words", "status", "said"),
    [
        (["ctl", "unix:{tmp}/none.sock", "info"], 3, "cannot reach the node"),  # 3: unreachable
        (["status", "-p", "none-such"], 3, "fabric none-such is not running"),
        (["events", "-p", "none-such", "--no-follow"], 3, "fabric none-such is not running"),
    ],
)
def test_commands_that_only_show_start_without_the_kinds_or_pydantic(
    tmp_path: Path, words: list[str], status: int, said: str
) -> None:
    """`nbdfabric ctl`, `health` and the commands that read a running fabric (`status`, `down`,
    `logs`, `events`) only show values (nodes.values) and names (orchestrator.names): the kinds'
    modules and the pydantic params models (about half of a 0.2-0.3 s start) are not imported."""
    argv = [w.format(tmp=tmp_path) for w in words]
    probe = (
        "import sys; from nodes import cli\n"
        f"status = cli.main({argv!r})\n"
        "print(status, sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic'\n"
        "    or m in ('nodes.registry', 'nodes.params', 'orchestrator.topology')))\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=60)  # fmt: skip
    assert res.stdout == f"{status} []\n", res
    assert said in res.stderr
