"""Secrets given on the command line in nbdkit's forms (nbdkit_read_password): `SECRET`
itself, `+FILE` (its first line), `-FD` (the first line read from that inherited file
descriptor) or `-` (asked for on the terminal, not echoed). The first line keeps everything
but its newline (a `\\r` too, as nbdkit). `luks` passphrase= and `http` password= use it.
"""

from __future__ import annotations

import getpass
import os
import sys

#: The longest secret read from a file or a file descriptor (`+/dev/zero` must not read on).
MAX_SECRET = 64 * 1024


def check_form(value: str) -> str:
    """`value` if its form can be read (a params validator): only the forms that read the secret
    from elsewhere can be wrong, and a bad one is not the secret, so it may be shown."""
    if value == "+":
        raise ValueError("+FILE needs a file name")
    if value.startswith("-") and value != "-":
        digits = value[1:]
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError("-FD needs a file descriptor number (a secret that starts with '-' "
                             "can be given in a file: +FILE)")  # fmt: skip
        if int(digits) < 3:
            raise ValueError("-FD cannot be stdin, stdout or stderr (0, 1, 2)")
    return value


def read_secret(key: str, value: str, prompt: str) -> bytes:
    """The secret `KEY=VALUE` gives; ValueError naming `KEY=VALUE` (never the secret itself:
    only the forms that read it are named) if it cannot be read."""
    if value == "-":
        if not sys.stdin.isatty():
            raise ValueError(f"{key}=-: stdin is not a terminal to ask on (give {key}=+FILE or "
                             f"{key}=-FD)")  # fmt: skip
        try:
            return getpass.getpass(prompt).encode()
        except EOFError:
            raise ValueError(f"{key}=-: nothing was typed (end of input)") from None
    if value.startswith("+"):
        try:
            fd = os.open(value[1:], os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ValueError(f"{key}={value}: cannot open the file: {exc.strerror}") from None
        return _first_line(fd, f"{key}={value}")
    if value.startswith("-"):
        return _first_line(int(value[1:]), f"{key}={value}")
    return value.encode()


def _first_line(fd: int, given: str) -> bytes:
    """The first line read from `fd` (up to a newline or the end), which is then closed."""
    data = bytearray()
    try:
        while b"\n" not in data and len(data) <= MAX_SECRET:
            piece = os.read(fd, 4096)
            if not piece:
                break
            data += piece
    except OSError as exc:
        raise ValueError(f"{given}: cannot read it: {exc.strerror}") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # not open: os.read said so already
    line = bytes(data).split(b"\n", 1)[0]
    if len(line) > MAX_SECRET:
        raise ValueError(f"{given}: longer than {MAX_SECRET} bytes")
    return line
