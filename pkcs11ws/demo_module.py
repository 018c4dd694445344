"""The PKCS#11 half of `make demo`: OpenSC's pkcs11-tool drives libpkcs11ws.so.

The passphrase reaches pkcs11-tool through its `--pin env:NAME` form, so it is never in argv
(pkcs11-tool reads a PIN from standard input only when its standard output is a terminal).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class _Steps(Protocol):
    def step(self, name: str, fn: Callable[[], str]) -> bool: ...


def module_path() -> str:
    from pkcs11ws.paths import module_path as mp

    return mp()


def run(demo: _Steps, cfg_path: str, card: str, passphrase: str) -> bool:
    tool = shutil.which("pkcs11-tool")
    if tool is None:
        raise RuntimeError("pkcs11-tool not found: install Debian's opensc (make setup does)")
    module = module_path()
    env = {**os.environ, "PKCS11WS_CONFIG": cfg_path, "PKCS11WS_DEMO_PIN": passphrase}
    tmp = Path(tempfile.mkdtemp(prefix="pkcs11ws-demo-"))

    def p11(*args: str, login: bool = True) -> str:
        argv = [tool, "--module", module, "--token-label", card, *args]
        if login:
            argv += ["--login", "--pin", "env:PKCS11WS_DEMO_PIN"]
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"pkcs11-tool {' '.join(args)} failed: {r.stderr.strip()[-400:]}")
        return r.stdout

    def list_slots() -> str:
        out = p11("-L", login=False)
        if card not in out:
            raise AssertionError(f"token {card} not listed:\n{out}")
        return f"pkcs11-tool -L lists token {card!r}"

    def aes() -> str:
        p11(
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            "p11-aes",
            "--id",
            "a1",
            "--private",
            "--sensitive",
        )
        msg = tmp / "msg.txt"
        msg.write_bytes(b"pkcs11ws: a PKCS#11 module with its keys over mutual TLS\n")
        iv = os.urandom(16).hex()
        p11(
            "--encrypt",
            "--mechanism",
            "AES-CBC-PAD",
            "--iv",
            iv,
            "--id",
            "a1",
            "-i",
            str(msg),
            "-o",
            str(tmp / "ct.bin"),
        )
        p11(
            "--decrypt",
            "--mechanism",
            "AES-CBC-PAD",
            "--iv",
            iv,
            "--id",
            "a1",
            "-i",
            str(tmp / "ct.bin"),
            "-o",
            str(tmp / "pt.txt"),
        )
        if (tmp / "pt.txt").read_bytes() != msg.read_bytes():
            raise AssertionError("pkcs11-tool decrypt(encrypt(m)) != m")
        ct = (tmp / "ct.bin").stat().st_size
        return f"C_GenerateKey AES-256, C_Encrypt/C_Decrypt CBC-PAD round trip ({ct}-byte ct)"

    def hmac() -> str:
        p11(
            "--keygen",
            "--key-type",
            "GENERIC:32",
            "--label",
            "p11-hmac",
            "--id",
            "a2",
            "--private",
            "--sensitive",
            "--usage-sign",
        )
        msg = tmp / "msg.txt"
        p11(
            "--sign",
            "--mechanism",
            "SHA256-HMAC",
            "--id",
            "a2",
            "-i",
            str(msg),
            "-o",
            str(tmp / "mac.bin"),
        )
        out = p11(
            "--verify",
            "--mechanism",
            "SHA256-HMAC",
            "--id",
            "a2",
            "-i",
            str(msg),
            "--signature-file",
            str(tmp / "mac.bin"),
        )
        if "Signature is valid" not in out:
            raise AssertionError(f"verify said: {out.strip()}")
        size = (tmp / "mac.bin").stat().st_size
        return f"C_GenerateKey GENERIC:32, HMAC-SHA256 C_Sign ({size} bytes) and C_Verify"

    def data_object() -> str:
        blob = tmp / "data.bin"
        blob.write_bytes(b"<config> & \xc3\xa9 \x00\x01\x02 </config>")
        p11("--write-object", str(blob), "--type", "data", "--label", "p11-data", "--private")
        p11("--read-object", "--type", "data", "--label", "p11-data", "-o", str(tmp / "back.bin"))
        if (tmp / "back.bin").read_bytes() != blob.read_bytes():
            raise AssertionError("data object read back differs")
        return f"data object of {blob.stat().st_size} bytes written and read back byte for byte"

    def objects() -> str:
        out = p11("-O")
        n = out.count("Secret Key Object") + out.count("Data object")
        return f"pkcs11-tool -O lists {n} objects"

    try:
        for title, fn in (
            ("pkcs11-tool: list slots", list_slots),
            ("pkcs11-tool: AES key generation, encrypt/decrypt", aes),
            ("pkcs11-tool: HMAC key generation, sign/verify", hmac),
            ("pkcs11-tool: data object write/read", data_object),
            ("pkcs11-tool: list objects", objects),
        ):
            if not demo.step(title, fn):
                return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
