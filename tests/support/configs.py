"""A module configuration (pkcs11ws.config.Config) built in-process for the unit tests of the
log writer and the client's policy: no file, no service."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pkcs11ws.config import Config


def make_cfg(tmp_path: Path, **kw: Any) -> Config:
    """A Config logging to tmp_path/p11.log at DEBUG1 with no retries; `kw` replaces fields."""
    base = Config(
        host="h",
        port=18001,
        cert="c",
        key="k",
        auth="a",
        loglevel=4,
        logstdout=False,
        logsys=False,
        logfilepath=str(tmp_path / "p11.log"),
        maxretries=0,
        retrydelay=0,
        connecttimeout=1,
        timeout=1,
        path="x",
        overrides=(),
        warnings=(),
    )
    return dataclasses.replace(base, **kw)
