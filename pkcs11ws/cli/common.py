"""What the utilities share: reading a passphrase, the default module path, output helpers.

Passphrases are never taken from argv: on a terminal they are prompted for without echo, else
one line is read from standard input (so scripts can pipe them in).
"""

from __future__ import annotations

import functools
import getpass
import os
import sys
from collections.abc import Callable
from typing import ParamSpec, TextIO

from pkcs11ws import protocol

P = ParamSpec("P")


class UsageError(Exception):
    """Bad command line or input: the tool prints the message and exits 2."""


def read_passphrase(
    stdin: TextIO, prompt: str = "Passphrase: ", confirm: str | None = None
) -> bytes:
    """One passphrase: prompted without echo on a tty (twice when confirm is given), else a line
    of stdin. UsageError when missing, mismatched, or longer than the service accepts."""
    if stdin.isatty():
        value = getpass.getpass(prompt)
        if confirm is not None and getpass.getpass(confirm) != value:
            raise UsageError("the passphrases do not match")
    else:
        line = stdin.readline()
        if not line:
            raise UsageError("no passphrase on standard input")
        value = line.rstrip("\r\n")
    data = value.encode("utf-8")
    if not 1 <= len(data) <= protocol.MAX_PASSPHRASE:
        raise UsageError(f"the passphrase must be 1 to {protocol.MAX_PASSPHRASE} bytes")
    return data


def default_library() -> str:
    """Our own module (what `python -m pkcs11ws module-path` prints); FileNotFoundError if not
    built."""
    from pkcs11ws.paths import module_path

    return module_path()


def library_or_default(path: str | None) -> str:
    if path:
        return os.path.abspath(path)
    return default_library()


def err(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr)


def pipe_safe(main: Callable[P, int]) -> Callable[P, int]:
    """A tool's main() that ends quietly when its reader goes away (`ckmechinfo | head`).

    The remaining output goes to /dev/null, so neither the tool nor the interpreter's final
    flush prints a BrokenPipeError traceback; the status is 141 (128 + SIGPIPE), as for a C tool.
    """

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            rv = main(*args, **kwargs)
            sys.stdout.flush()
            return rv
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 141

    return wrapper
