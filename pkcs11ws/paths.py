"""Where the package's own files are: the built PKCS#11 module.

A leaf module (imports nothing of pkcs11ws at import time), so the command line (__main__.py),
the installer and the utilities can all ask it without importing each other.
"""

from __future__ import annotations

import os

MODULE_NAME = "libpkcs11ws.so"


def module_path() -> str:
    """The built PKCS#11 module inside the installed package (FileNotFoundError if not built)."""
    from pkcs11ws import _native

    path = os.path.join(os.path.dirname(os.path.abspath(_native.__file__)), MODULE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not built: run `make build` (pip install -e .)")
    return path
