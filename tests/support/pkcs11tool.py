"""OpenSC's pkcs11-tool on one softcard, the one wrapper every test that runs it uses.

The module and the token label go in argv; the passphrase reaches it as `--pin env:VAR` (0.23
reads no PIN from a stdin that is not a terminal, and secrets stay out of argv); its environment
is the test process's without any PKCS11WS_* variable, plus our client configuration
(dropin_util.consumer_env). A missing pkcs11-tool skips the test loudly, naming the package.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from pkcs11ws.__main__ import module_path
from tests.support.dropin_util import PIN_ENV, consumer_env, require


class Pkcs11Tool:
    def __init__(
        self, cfg: Path, card: str, pin: str, card_id: str = "", text: bool = True
    ) -> None:
        """cfg: the client configuration; card: the token label; card_id: the softcard's id on
        the service (for tests that also talk to it directly); text: str or bytes output."""
        self.path = require(shutil.which("pkcs11-tool"), "OpenSC pkcs11-tool", "opensc")
        self.cfg, self.card, self.pin, self.card_id, self.text = cfg, card, pin, card_id, text
        self.env = consumer_env(cfg, pin)

    def run(
        self,
        *args: str,
        login: bool = True,
        token: bool = True,
        ok: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[Any]:
        """pkcs11-tool ARGS on this softcard (token=False: no --token-label), logged in unless
        login=False; ok: assert it exits 0. A crash fails the test whatever `ok` says."""
        argv = [self.path, "--module", module_path()]
        if token:
            argv += ["--token-label", self.card]
        argv += list(args)
        if login:
            argv += ["--login", "--pin", f"env:{PIN_ENV}"]
        r = subprocess.run(
            argv, env=env or self.env, capture_output=True, text=self.text, timeout=timeout
        )
        err = r.stderr if self.text else r.stderr.decode(errors="replace")
        assert "Segmentation" not in err and r.returncode >= 0, err
        if ok:
            assert r.returncode == 0, f"{args}: {r.stdout!r}\n{err}"
        return r

    def with_key(
        self, action: str, key_id: str, mech: str, src: Path, *more: str, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """pkcs11-tool ACTION --id KEY_ID -m MECH -i SRC MORE... (--sign, --verify, --encrypt,
        --decrypt on one key of this softcard); kw as for run()."""
        return self.run(action, "--id", key_id, "-m", mech, "-i", str(src), *more, **kw)
