"""The `sh` and `eval` plugins with scripts written here (a file-backed disk in bash, as the
example in nbdkit-sh-plugin(3)), through real clients, and beside nbdkit 1.32's sh and eval
plugins running the very same scripts: same data, capabilities, extents and errors.

Where we knowingly differ from nbdkit (see nodes/plugins/sh.py): a script that hangs is killed
after `script-timeout` (nbdkit waits forever: not compared); requests that break the script's
block_size are refused; EACCES reaches clients as EPERM.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from conftest import (
    NBDFABRIC,
    ROOT,
    Proc,
    capabilities,
    every_request_kind,
    nbd_connect,
    read_all,
    run,
    wait_for,
)

from nodes.params import ParamError, parse_params
from nodes.plugins._script import parse_export_list, parse_extents
from nodes.plugins.eval import Eval
from nodes.plugins.sh import Sh

KiB, MiB = 1024, 1024 * 1024

#: A disk in a file (`file=PATH`), nbdkit-sh-plugin(3)'s way; `log=PATH` notes every call.
DISK = r"""#!/bin/bash
[ -e "$tmpdir/log" ] && echo "$*" >> "$(cat "$tmpdir/log")"
f=$tmpdir/file
case "$1" in
  config)
    case "$2" in
      file) ln -sf "$(realpath "$3")" "$f" ;;
      log) echo "$3" > "$tmpdir/log" ;;
      *) echo "EINVAL unknown parameter $2=$3" >&2; exit 1 ;;
    esac ;;
  config_complete) [ -e "$f" ] || { echo "EINVAL file= is required" >&2; exit 1; } ;;
  thread_model) echo parallel ;;
  open) mktemp -d "$tmpdir/handle-XXXXXX" ;;
  close) rm -rf "$2" ;;
  get_size) stat -L -c %s "$f" ;;
  can_write|can_flush|can_trim|can_zero|can_multi_conn) exit 0 ;;
  can_fua) echo native ;;
  can_cache) echo emulate ;;
  pread) dd if="$f" skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none ;;
  pwrite) dd of="$f" seek=$4 conv=notrunc oflag=seek_bytes status=none ;;
  flush) sync "$f" ;;
  trim|zero) fallocate -p -o "$4" -l "$3" -n "$f" ;;
  *) exit 2 ;;
esac
"""

#: Capabilities from `config` (`can_write=0`, `can_fua=native`, ...): an exit status or what
#: to print; a method not given is missing (exit 2). Reads zeros, takes writes.
CAPS = r"""#!/bin/bash
case "$1" in
  config) echo "$3" > "$tmpdir/$2" ;;
  get_size) echo 1M ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  pwrite) cat > /dev/null ;;
  flush|trim|zero|cache) ;;
  can_*|is_rotational)
    [ -e "$tmpdir/$1" ] || exit 2
    v=$(cat "$tmpdir/$1")
    case "$v" in [0-9]*) exit "$v" ;; *) echo "$v" ;; esac ;;
  *) exit 2 ;;
esac
"""

#: pread fails in the way its offset / 512 picks (stderr, exit status), and the errno
#: nbdkit 1.32 gives the client for it.
READ_FAILURES = [
    ("ENOSPC no room", 1, "ENOSPC"),
    ("", 1, "EIO"),  # nothing said
    ("EPERM x", 9, "EPERM"),  # 4-127: failed, as 1
    ("EPERM x", 4, "EPERM"),
    ("", 3, "EIO"),  # false, for a method that is not a question
    ("", 2, "EIO"),  # pread is required
    ("enospc lower case", 1, "ENOSPC"),
    ("  ENOSPC after spaces", 1, "EIO"),  # the name must come first
    ("ENOSPC:colon", 1, "EIO"),  # ... followed by whitespace or nothing
    ("EFOO no such errno", 1, "EIO"),
    ("ENOMEM x", 1, "ENOMEM"),
    ("ESHUTDOWN x", 1, "ESHUTDOWN"),
    ("EROFS x", 1, "EPERM"),
    ("EDQUOT x", 1, "ENOSPC"),
    ("", 200, "EIO"),
    ("EINVAL", 1, "EINVAL"),
    ("ENOSPC", 42, "ENOSPC"),
    ("first line\nENOSPC second", 1, "EIO"),
    ("EOVERFLOW x", 1, "EINVAL"),  # only an answer to DF (spec)
]


def failing_reads() -> str:
    cases = "\n".join(
        f"    {i}) printf '%b' {json.dumps(err)} >&2; exit {status} ;;"
        for i, (err, status, _) in enumerate(READ_FAILURES)
    )
    return f"""#!/bin/bash
case "$1" in
  get_size) echo 1M ;;
  can_write) exit 0 ;;
  pwrite) cat >/dev/null; echo "ENOSPC disk full" >&2; exit 1 ;;
  pread)
    case $(( $4 / 512 )) in
{cases}
    {len(READ_FAILURES)}) head -c 100 /dev/zero ;;
    {len(READ_FAILURES) + 1}) head -c 1000 /dev/zero ;;
    {len(READ_FAILURES) + 2}) echo EPERM >&2; kill -9 $$ ;;
    *) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
    esac ;;
  *) exit 2 ;;
esac
"""


def write_script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def image(path: Path, size: int = 4 * MiB, seed: int = 1) -> Path:
    """A file of `size` random bytes (with a hole in the middle)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rng.randbytes(size // 4))
        f.seek(size // 2)
        f.write(rng.randbytes(size // 2))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_io(uri: str, *commands: str) -> None:
    run(["qemu-io", "-f", "raw", "-t", "writeback", uri, *(a for c in commands for a in ("-c", c))])


def errno_name(call: Callable[[], object]) -> str | None:
    """The errno name (libnbd's nbd.Error.errno) of what `call` raises; None if it works."""
    try:
        call()
    except nbd.Error as exc:
        return str(exc.errno)
    return None


def json_info(uri: str) -> dict:
    return json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]


WORKLOAD = (
    "write -P 0xab 0 1M",
    "write -f -P 0xcd 1536K 4K",  # FUA
    "write -z 2M 64K",
    "write -z -u 2112K 64K",  # may trim
    "discard 3M 128K",
    "aio_write -P 0x11 1100K 8K",
    "aio_flush",
    "read -P 0xab 0 1M",
    "read -P 0xcd 1536K 4K",
    "read -P 0 2M 128K",
    "read -P 0x11 1100K 8K",
)


# -- a file-backed disk -------------------------------------------------------------------------


def test_sh_file_disk_serves_real_clients(start_node: Callable[..., Proc], tmp_path: Path):
    script = write_script(tmp_path, "disk.sh", DISK)
    disk = image(tmp_path / "disk.img")
    node = start_node("sh", script, f"file={disk}")
    assert read_all(node.uri) == disk.read_bytes()
    qemu_io(node.uri, *WORKLOAD)
    # nbdcopy out and in again, checksummed against the file behind the script.
    out = tmp_path / "copy.img"
    run(["nbdcopy", node.uri, str(out)])
    assert digest(out) == digest(disk)
    other = image(tmp_path / "other.img", seed=2)
    run(["nbdcopy", "--flush", str(other), node.uri])
    assert digest(disk) == digest(other)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(other), node.uri])
    info = json_info(node.uri)
    assert info["export-size"] == 4 * MiB and not info["is_read_only"]
    assert info["can_multi_conn"] and info["can_fua"] and info["can_cache"]


def test_sh_same_data_and_capabilities_as_nbdkit(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    script = write_script(tmp_path, "disk.sh", DISK)
    ours_img, theirs_img = image(tmp_path / "ours.img"), image(tmp_path / "theirs.img")
    ours = start_node("sh", script, f"file={ours_img}")
    theirs = start_nbdkit("sh", script, f"file={theirs_img}")
    assert capabilities(ours.uri) == capabilities(theirs.uri)
    for uri in (ours.uri, theirs.uri):
        qemu_io(uri, *WORKLOAD)
        h = nbd_connect(uri)
        h.zero(4096, 3 * MiB + 4096, nbd.CMD_FLAG_FUA)
        h.cache(64 * KiB, 0)
        h.flush()
        h.shutdown()
    assert digest(ours_img) == digest(theirs_img)
    assert read_all(ours.uri) == read_all(theirs.uri) == ours_img.read_bytes()


def test_sh_handle_from_open_goes_to_every_call_of_its_connection(
    start_node: Callable[..., Proc], tmp_path: Path
):
    script = write_script(tmp_path, "disk.sh", DISK)
    disk, log = image(tmp_path / "disk.img"), tmp_path / "calls.log"
    node = start_node("sh", script, f"file={disk}", f"log={log}")
    for _ in range(2):
        h = nbd_connect(node.uri)
        h.pread(4096, 0)
        h.pwrite(b"x" * 512, 0)
        h.flush()
        h.shutdown()
    wait_for(lambda: log.read_text().count("close ") == 2, 10, "both closes")
    calls = [line.split() for line in log.read_text().splitlines()]
    opens = [i for i, c in enumerate(calls) if c[0] == "open"]
    assert len(opens) == 2
    assert calls[opens[0]][1:] == ["false", "false"]  # readonly, export "" (no arg), tls
    handles = []
    for start in opens:
        rest = calls[start + 1 :]
        end = next(i for i, c in enumerate(rest) if c[0] == "close")
        used = {c[1] for c in rest[: end + 1]}
        assert len(used) == 1, rest[: end + 1]  # one handle for the whole connection
        handles.append(used.pop())
    assert handles[0] != handles[1]
    assert all("/handle-" in h and not os.path.exists(h) for h in handles)  # close removed it
    methods = [c[0] for c in calls[opens[0] : opens[0] + 14]]
    assert methods == [
        "open", "get_size", "can_write", "can_zero", "can_fast_zero", "can_trim", "can_fua",
        "can_flush", "is_rotational", "can_multi_conn", "can_cache", "can_extents",
        "block_size", "export_description",
    ]  # fmt: skip
    # The log begins with config log=: the start-up methods after it, in nbdkit's order.
    assert calls[:4] == [["config_complete"], ["thread_model"], ["get_ready"], ["after_fork"]]


def test_sh_config_gets_other_params_in_order_and_bare_words(
    start_node: Callable[..., Proc], tmp_path: Path
):
    log = tmp_path / "config.log"
    script = write_script(
        tmp_path,
        "conf.sh",
        f"""#!/bin/bash
case "$1" in
  magic_config_key) echo file ;;
  config) printf '%s=%s\\n' "$2" "$3" >> {log} ;;
  get_size) echo 1M ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  *) exit 2 ;;
esac
""",
    )
    start_node(
        "sh", script, "disk.img", "a=1", "b.c=two words", "a=3", "x+y=5", "script-timeout=9s"
    )
    assert log.read_text().splitlines() == [
        "file=disk.img",
        "file=x+y=5",  # not a key (nbdkit's rule): a value for the magic key
        "a=1",
        "a=3",
        "b.c=two words",
    ]


def test_sh_missing_methods_give_nbdkits_defaults(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    script = write_script(tmp_path, "caps.sh", CAPS)
    variants = [
        [],
        ["can_write=0"],
        ["can_write=0", "can_flush=0"],
        ["can_write=0", "can_zero=0"],
        ["can_write=0", "can_zero=3", "can_fast_zero=0"],
        ["can_write=0", "can_fua=native", "can_trim=0", "can_cache=emulate"],
        ["can_write=0", "can_fua=none", "can_flush=0", "can_multi_conn=0", "can_cache=native"],
        ["can_write=3", "can_flush=0", "can_extents=0", "is_rotational=0"],
    ]
    for words in variants:
        ours, theirs = start_node("sh", script, *words), start_nbdkit("sh", script, *words)
        keys = (*capabilities(ours.uri), "is_rotational")
        assert capabilities(ours.uri, keys) == capabilities(theirs.uri, keys), words
        ours.stop(), theirs.stop()


def test_sh_request_arguments_and_flags_as_nbdkit_passes_them(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    log = tmp_path / "requests.log"
    script = write_script(
        tmp_path,
        "flags.sh",
        f"""#!/bin/bash
case "$1" in
  pwrite|zero|trim|extents|cache|flush) echo "$1 ${{@:3}}" >> {log} ;;
esac
case "$1" in
  get_size) echo 1M ;;
  can_write|can_flush|can_trim|can_zero|can_fast_zero|can_extents) exit 0 ;;
  can_fua|can_cache) echo native ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  pwrite) cat > /dev/null ;;
  extents) echo "$4 $3 hole,zero" ;;
  zero|trim|cache|flush) ;;
  *) exit 2 ;;
esac
""",
    )
    calls = {}
    for name, node in (("ours", start_node("sh", script)), ("nbdkit", start_nbdkit("sh", script))):
        h = nbd_connect(node.uri)
        every_request_kind(h)
        h.shutdown()
        node.stop()
        calls[name] = log.read_text().splitlines()
        log.unlink()
    assert (
        calls["ours"]
        == calls["nbdkit"]
        == [
            "pwrite 512 512 ",
            "pwrite 512 1024 fua",
            "zero 4096 4096 may_trim",
            "zero 4096 4096 ",
            "zero 4096 8192 fua,may_trim,fast",
            "trim 4096 0 fua",
            "trim 4096 0 ",
            "cache 4096 0",
            "flush ",
            "extents 65536 0 req_one",
            "extents 65536 4096 ",
        ]
    )


@pytest.mark.parametrize(
    ("words", "yes", "no"),
    [
        # zero written as zeros, so a fast zero fails at once: "supported" (nbdkit's default)
        (["can_write=0", "can_flush=0", "can_trim=0"],
         {"flush", "trim", "fua", "zero", "fast-zero"}, {"cache"}),
        (["can_write=0", "can_zero=0", "can_fast_zero=3", "can_cache=native"],
         {"zero", "cache"}, {"fast-zero", "trim", "flush", "fua"}),
        (["can_multi_conn=0", "can_write=3"], {"multi-conn"}, {"zero", "trim", "fua"}),
    ],
)  # fmt: skip
def test_sh_can_answers_are_what_nbdinfo_can_says(
    words: list[str], yes: set[str], no: set[str], start_node: Callable[..., Proc], tmp_path: Path
):
    node = start_node("sh", write_script(tmp_path, "caps.sh", CAPS), *words)
    for what in yes | no:
        res = run(["nbdinfo", "--can", what, node.uri], check=False)
        assert res.returncode == (0 if what in yes else 2), (what, res.returncode)


def test_sh_errors_reach_the_client_as_nbdkit_gives_them(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    script = write_script(tmp_path, "fail.sh", failing_reads())
    ours, theirs = start_node("sh", script), start_nbdkit("sh", script)

    def failures(uri: str) -> list[str | None]:
        h = nbd_connect(uri)
        got = [errno_name(lambda i=i: h.pread(512, i * 512)) for i in range(23)]
        got.append(errno_name(lambda: h.pwrite(b"y" * 512, 0)))
        h.shutdown()
        return got

    got = {"ours": failures(ours.uri), "nbdkit": failures(theirs.uri)}
    expected = [e for _, _, e in READ_FAILURES] + ["EIO", "EIO", "EPERM", None, "ENOSPC"]
    assert got["ours"] == expected
    # A wrong number of bytes: nbdkit 1.32 sets no errno for it, and the client gets the one
    # the thread was left with (EINVAL after EOVERFLOW's failure here); we say EIO.
    short, long = len(READ_FAILURES), len(READ_FAILURES) + 1
    assert [e for i, e in enumerate(got["nbdkit"]) if i not in (short, long)] == [
        e for i, e in enumerate(expected) if i not in (short, long)
    ]
    log = ours.stderr()
    assert "no room" in log and "incorrect amount of data read" in log
    assert "killed by signal 9" in log and "said nothing on stderr" in log


def test_sh_extents_as_nbdkit_maps_them(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    script = write_script(
        tmp_path,
        "map.sh",
        r"""#!/bin/bash
case "$1" in
  get_size) echo 1M ;;
  can_extents) exit 0 ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  extents)
    case $4 in
      4096) echo "0 8k hole"; echo "8k 4k" ;;  # starts before the offset asked for
      12288) echo "12288 4096"; echo "20480 4096" ;;  # a gap
      16384) ;;  # nothing
      20480) echo "20480 4k zero"; echo "garbage" ;;
      *) printf '0\t64K\n64K 64K hole,zero\n128K 64K 3\n192K 64K zero\n256K 64K hole\n'
         echo "320K 2M 1" ;;  # past the end: cut there
    esac ;;
  *) exit 2 ;;
esac
""",
    )
    ours, theirs = start_node("sh", script), start_nbdkit("sh", script)
    mapped = run(["nbdinfo", "--map", "--json", ours.uri]).stdout
    assert json.loads(mapped) == json.loads(run(["nbdinfo", "--map", "--json", theirs.uri]).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in json.loads(mapped)][:4] == [
        (0, 64 * KiB, 0),
        (64 * KiB, 128 * KiB, 3),
        (192 * KiB, 64 * KiB, 2),
        (256 * KiB, 768 * KiB, 1),  # with 320K-1M, the same type
    ]
    for uri in (ours.uri, theirs.uri):
        check_odd_extents(uri)


def check_odd_extents(uri: str) -> None:
    h = nbd_connect(uri)
    seen: list[list[int]] = []
    h.block_status(4096, 4096, lambda ctx, off, ents, err: seen.append(list(ents)))
    assert seen[0][:2] == [4096, 1]  # (nbdkit goes on past the length asked for)
    assert errno_name(lambda: h.block_status(4096, 12288, lambda *a: 0)) == "EINVAL"
    assert errno_name(lambda: h.block_status(4096, 16384, lambda *a: 0)) == "EINVAL"
    assert errno_name(lambda: h.block_status(4096, 20480, lambda *a: 0)) == "EIO"
    h.shutdown()


def test_sh_exports_listed_and_named_as_nbdkit(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    script = write_script(
        tmp_path,
        "list.sh",
        r"""#!/bin/bash
case "$1" in
  list_exports) printf 'INTERLEAVED\nfoo\nthe foo\nbar\nthe bar\nodd\n' ;;
  default_export) echo bar ;;
  open) echo "h-$3" ;;
  get_size) case $2 in h-foo) echo 1M ;; *) echo 2M ;; esac ;;
  export_description) echo "described $2" ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  *) exit 2 ;;
esac
""",
    )
    ours, theirs = start_node("sh", script), start_nbdkit("sh", script)
    for uri in (ours.uri, theirs.uri):
        assert listing(uri) == [("foo", "the foo"), ("bar", "the bar"), ("odd", "")]
        h = nbd.NBD()
        h.set_full_info(True)
        h.connect_uri(uri)  # "": the default export, bar
        assert h.get_canonical_export_name() == "bar"
        assert h.get_export_description() == "described h-bar"
        assert h.get_size() == 2 * MiB
        h.shutdown()
        assert json_info(uri.replace(":///", ":///foo"))["export-size"] == MiB


def listing(uri: str) -> list[tuple[str, str]]:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    listed: list[tuple[str, str]] = []
    h.opt_list(lambda name, desc: listed.append((name, desc)))
    h.opt_abort()
    return listed


def test_sh_read_only_and_preconnect(start_node: Callable[..., Proc], tmp_path: Path):
    log = tmp_path / "calls.log"
    script = write_script(
        tmp_path,
        "ro.sh",
        f"""#!/bin/bash
echo "$*" >> {log}
case "$1" in
  preconnect) [ -e {tmp_path}/refuse ] && {{ echo "EPERM go away" >&2; exit 1; }}; exit 0 ;;
  get_size) echo 1M ;;
  can_write) exit 0 ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  *) exit 2 ;;
esac
""",
    )
    node = start_node("sh", script, extra=("--read-only",))
    assert json_info(node.uri)["is_read_only"]
    calls = log.read_text().splitlines()
    assert "preconnect true" in calls and "open true  false" in calls
    assert not any(c.startswith(("can_write", "can_zero", "can_trim", "can_fua")) for c in calls)
    (tmp_path / "refuse").touch()
    with pytest.raises(nbd.Error):
        nbd_connect(node.uri)
    (tmp_path / "refuse").unlink()
    assert read_all(node.uri, 4096) == bytes(4096)


# -- a script that misbehaves ------------------------------------------------------------------


def test_sh_misbehaving_script_fails_requests_not_the_node(
    start_node: Callable[..., Proc], tmp_path: Path
):
    pids = tmp_path / "pids"
    script = write_script(
        tmp_path,
        "bad.sh",
        f"""#!/bin/bash
case "$1" in
  open) echo "$3" ;;
  get_size) [ "$2" = garbage ] && echo "lots of bytes" || echo 1M ;;
  can_write) exit 0 ;;
  can_fua) [ "$2" = fua ] && echo sometimes || echo none ;;
  pread)
    case $4 in
      0) sleep 600 & echo $! >> {pids}; wait ;;  # hangs
      512) (sleep 600; echo late) & echo $! >> {pids}; exit 0 ;;  # leaves stdout open
      1024) exit 42 ;;
      1536) head -c 1G /dev/zero ;;  # far more than asked for
      *) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
    esac ;;
  *) exit 2 ;;
esac
""",
    )
    node = start_node("sh", script, "script-timeout=1s")
    h = nbd_connect(node.uri)
    for offset in (0, 512, 1024, 1536):
        assert errno_name(lambda o=offset: h.pread(512, o)) == "EIO", offset
    assert h.pread(512, 2048) == bytes(512)  # the same connection serves on
    h.shutdown()
    for pid in pids.read_text().split():  # killed with their script's process group
        wait_for(lambda p=pid: not os.path.exists(f"/proc/{p}"), 10, f"{pid} to be killed")
    for name in ("garbage", "fua"):  # what it says of the export makes no sense: refused
        with pytest.raises(nbd.Error):
            nbd_connect(node.uri.replace(":///", f":///{name}"))
    h = nbd_connect(node.uri)  # ... and other clients are served
    assert h.pread(4096, 4096) == bytes(4096)
    h.shutdown()
    log = node.stderr()
    assert "no answer within 1s: killed" in log
    assert "received more from the script" in log
    assert "cannot parse 'lots of bytes'" in log and "sometimes" in log
    assert node.proc.poll() is None


def test_sh_thread_model_lets_requests_overlap_or_not(
    start_node: Callable[..., Proc], tmp_path: Path
):
    """A read waits (up to three seconds) for another client's write: it sees it only where
    the script's thread model lets the two run at once."""
    script = write_script(
        tmp_path,
        "gate.sh",
        r"""#!/bin/bash
case "$1" in
  config) echo "$3" > "$tmpdir/$2" ;;
  thread_model) cat "$tmpdir/model" ;;
  get_size) echo 1M ;;
  can_write) exit 0 ;;
  pread)
    touch "$(cat "$tmpdir/dir")/reading"
    for i in $(seq 60); do [ -e "$tmpdir/go" ] && break; sleep 0.05; done
    [ -e "$tmpdir/go" ] || { echo "ETIMEDOUT no write came" >&2; exit 1; }
    dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  pwrite) cat > /dev/null; touch "$tmpdir/go" ;;
  *) exit 2 ;;
esac
""",
    )
    outcomes = {}
    for model in ("parallel", "serialize_requests", "serialize_all_requests"):
        folder = tmp_path / model
        folder.mkdir()
        node = start_node("sh", script, f"model={model}", f"dir={folder}")
        reader, writer = nbd_connect(node.uri), nbd_connect(node.uri)
        cookie = reader.aio_pread(nbd.Buffer(512), 0)
        while not (folder / "reading").exists():  # the read is with the script
            reader.poll(100)
        writer.pwrite(b"w" * 512, 0)  # returns once written: after the read, if it waits
        try:
            while not reader.aio_command_completed(cookie):
                reader.poll(1000)
            outcomes[model] = "read"
        except nbd.Error as exc:
            outcomes[model] = str(exc.errno)
        reader.shutdown()
        writer.shutdown()
        node.stop()
    assert outcomes == {
        "parallel": "read",
        "serialize_requests": "read",  # one at a time per client: two clients overlap
        "serialize_all_requests": "EIO",  # the write waited for the read, which gave up
    }


# -- eval ---------------------------------------------------------------------------------------


def test_eval_inline_scripts_serve_and_match_nbdkit(
    start_node: Callable[..., Proc], start_nbdkit: Callable[..., Proc], tmp_path: Path
):
    zeros = ["get_size=echo 64M", "pread=dd if=/dev/zero count=$3 iflag=count_bytes"]
    node = start_node("eval", *zeros)
    assert json_info(node.uri)["is_read_only"] and read_all(node.uri, MiB) == bytes(MiB)
    # nbdkit-eval-plugin(1)'s file plugin, with no can_* written: pwrite alone makes it
    # writable, flush and trim too.
    args = [
        'config=ln -sf "$(realpath "$3")" $tmpdir/file',
        "get_size=stat -Lc %s $tmpdir/file",
        "pread=dd if=$tmpdir/file skip=$4 count=$3 iflag=count_bytes,skip_bytes status=none",
        "pwrite=dd of=$tmpdir/file seek=$4 conv=notrunc oflag=seek_bytes status=none",
        "flush=sync $tmpdir/file",
        "trim=fallocate -p -o $4 -l $3 -n $tmpdir/file",
    ]
    ours_img, theirs_img = image(tmp_path / "ours.img"), image(tmp_path / "theirs.img")
    ours = start_node("eval", *args, f"file={ours_img}")
    theirs = start_nbdkit("eval", *args, f"file={theirs_img}")
    keys = (*capabilities(ours.uri), "is_rotational")
    assert capabilities(ours.uri, keys) == capabilities(theirs.uri, keys)
    assert capabilities(ours.uri)["can_flush"] and capabilities(ours.uri)["can_trim"]
    for uri in (ours.uri, theirs.uri):
        qemu_io(uri, *WORKLOAD)
    assert digest(ours_img) == digest(theirs_img)


def test_eval_missing_and_config(start_node: Callable[..., Proc], tmp_path: Path):
    log = tmp_path / "missing.log"
    node = start_node(
        "eval",
        "get_size=echo 1M",
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes",
        f'missing=echo "$@" >> {log}; exit 2',
        f'config=echo "config $2 $3" >> {log}',
        "colour=blue",
    )
    assert read_all(node.uri, 512) == bytes(512)
    calls = log.read_text().splitlines()
    assert calls[0] == "config colour blue"
    assert "thread_model" in calls and "can_write " in calls  # handle "" (no open)
    assert "load" not in calls and "magic_config_key" not in calls


# -- params and start-up -------------------------------------------------------------------------


def test_sh_and_eval_params_pass_unknown_keys_on(tmp_path: Path):
    p = parse_params("sh", Sh.Params, ["./x.sh", "v.img", "a=1", "a=2", "b=c=d"], Sh.magic)
    assert p.config_pairs() == [("", "v.img"), ("a", "1"), ("a", "2"), ("b", "c=d")]  # type: ignore[attr-defined]
    topo = parse_params("sh", Sh.Params, {"script": "x", "n": 5, "on": True, "l": ["1", 2]})
    assert topo.config_pairs() == [("n", "5"), ("on", "true"), ("l", "1"), ("l", "2")]  # type: ignore[attr-defined]
    bad = [
        ("sh", ["a=1"], "parameter 'script' is required"),
        ("sh", ["x.sh", "script-timeout=soon"], "bad value 'soon' for 'script-timeout'"),
        ("eval", ["stray"], "expected KEY=VALUE, got 'stray'"),
        ("eval", ["get_size=a", "get_size=b"], "parameter 'get_size' given twice"),
    ]
    for kind, words, message in bad:
        cls = Sh if kind == "sh" else Eval
        with pytest.raises(ParamError, match=message):
            parse_params(kind, cls.Params, words, cls.magic)
    for values, message in [
        ({"script": "x", "a b": "1"}, "'a b' is not a parameter name"),
        ({"script": "x", "k": {"n": 1}}, "bad value {'n': 1} for 'k'"),
    ]:
        with pytest.raises(ParamError, match=message):
            parse_params("sh", Sh.Params, values)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/x.sh"], "/nonexistent/x.sh: No such file or directory"),
        (["{dir}/plain.txt"], "Permission denied"),
        (["{dir}/disk.sh"], "file= is required"),  # the script's own config_complete
        (["{dir}/disk.sh", "colour=red"], "unknown parameter colour=red"),
        (["{dir}/disk.sh", "file=/dev/null", "stray"], "names no magic_config_key"),
        (["{dir}/nocfg.sh", "a=1"], "a=1: the script has no config method"),
    ],
)
def test_sh_refuses_to_start_saying_why(args: list[str], message: str, tmp_path: Path):
    write_script(tmp_path, "disk.sh", DISK)
    write_script(tmp_path, "nocfg.sh", "#!/bin/sh\nexit 2\n")
    (tmp_path / "plain.txt").write_text("echo hi\n")
    words = [a.format(dir=tmp_path) for a in args]
    res = subprocess.run(
        [*NBDFABRIC, "node", "sh", *words, "--listen", f"unix:{tmp_path}/n.sock"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_script_output_parsers():
    assert parse_export_list("NAMES+DESCRIPTIONS\na\nb\nc\nda\ndb\n") == [
        ("a", "da"),
        ("b", "db"),
        ("c", ""),
    ]
    assert parse_export_list("x\ny") == [("x", ""), ("y", "")]
    assert parse_export_list("") == [] and parse_export_list("NAMES\n") == []
    assert parse_extents("0 4k hole\n4K 4096 zero,hole,junk\n", 1024, 6000) == [
        (3072, 1),
        (1904, 3),
    ]
    with pytest.raises(OSError, match="cannot parse"):
        parse_extents("0 4k\n\n4k 4k\n", 0, 8192)


def test_sh_inline_script_from_stdin(tmp_path: Path):
    """`nbdfabric node sh -`: the script on stdin (no #!: run by /bin/sh), as `nbdkit sh -`."""
    text = 'case "$1" in get_size) echo 1M;; pread) head -c $3 /dev/zero;; *) exit 2;; esac\n'
    res = subprocess.run(
        [*NBDFABRIC, "node", "sh", "-", "--listen", f"unix:{tmp_path}/n.sock",
         "--run", 'nbdinfo --size "$uri"'],
        cwd=ROOT, input=text, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(MiB)


def test_sh_serialize_connections_takes_one_client_at_a_time(
    start_node: Callable[..., Proc], tmp_path: Path
):
    log = tmp_path / "calls.log"
    script = write_script(
        tmp_path,
        "one.sh",
        f"""#!/bin/bash
echo "$1" >> {log}
case "$1" in
  thread_model) echo serialize_connections ;;
  get_size) echo 1M ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  *) exit 2 ;;
esac
""",
    )
    node = start_node("sh", script)
    first = nbd_connect(node.uri)
    second: list[object] = []
    waiter = threading.Thread(target=lambda: second.append(nbd_connect(node.uri)))
    waiter.start()
    wait_for(lambda: log.read_text().count("preconnect") == 1, 10, "the first client")
    first.pread(512, 0)
    first.shutdown()
    waiter.join(30)
    assert second, "the second client was never served"
    calls = log.read_text().splitlines()
    # The second client's preconnect came after the first one's close.
    assert calls.index("close") < len(calls) - 1 - calls[::-1].index("preconnect")
    second[0].shutdown()  # type: ignore[attr-defined]


def test_topology_hands_other_params_to_the_script(tmp_path: Path) -> None:
    """A topology's sh params the kind does not declare reach the node's command line one
    word per value, and read back as the same config calls; the script's path is mapped."""
    from orchestrator.argv import param_words
    from orchestrator.topology import load_text

    text = """
nodes:
  disk: {kind: sh, params: {script: disk.sh, file: disk.img, size: 1024, sparse: true,
                            tag: [a, b], script-timeout: 5s}}
  calc: {kind: eval, params: {get_size: "echo 1M", pread: "head -c $3 /dev/zero"}}
exports:
  vm: {node: disk, listen: ["unix:vm.sock"]}
"""
    top = load_text(text, str(tmp_path / "fabric.yaml"), base_dir=str(tmp_path))
    words = param_words(top.nodes["disk"], lambda p: f"/mnt/{p}")
    assert words == ["script=/mnt/disk.sh", "file=disk.img", "size=1024", "sparse=true",
                     "tag=a", "tag=b", "script-timeout=5s"]  # fmt: skip
    again = parse_params("sh", Sh.Params, words, Sh.magic)
    assert again.config_pairs() == [  # type: ignore[attr-defined]
        ("file", "disk.img"), ("size", "1024"), ("sparse", "true"), ("tag", "a"), ("tag", "b")
    ]  # fmt: skip
    calc = parse_params("eval", Eval.Params, param_words(top.nodes["calc"]), Eval.magic)
    assert calc.get_size == "echo 1M"  # type: ignore[attr-defined]
