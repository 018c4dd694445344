"""Helpers for the utilities' tests (tests/cli/test_tools_*.py): run a tool as its own process, a
clean environment, softcards with objects on the real service, a SoftHSM2 token."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.service import Api, Service, encode, new_idem

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
HSM_LABEL, HSM_SO_PIN, HSM_PIN = "t", "1234", "5678"
PASSPHRASE = "correct horse 42"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any PKCS11WS_* or SOFTHSM2_CONF, plus extra."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PKCS11WS_") and k != "SOFTHSM2_CONF"
    }
    env.update(extra)
    return env


def service_env(svc: Service, **extra: str) -> dict[str, str]:
    """Environment for a tool talking to svc: its client config, no waiting between retries."""
    base = {"PKCS11WS_CONFIG": str(svc.client_cfg), "PKCS11WS_RETRYDELAY": "0"}
    return clean_env(**{**base, **extra})


def tool(
    module: str, *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """python -m pkcs11ws.cli.<module> args, as its own process."""
    return subprocess.run(
        [sys.executable, "-m", f"pkcs11ws.cli.{module}", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@dataclass
class Card:
    id: str
    name: str
    passphrase: str
    token: str  # an activation token for setting up objects over the API


def activated_card(svc: Service, passphrase: str = PASSPHRASE) -> Card:
    api = Api(svc)
    try:
        name = "t" + uuid.uuid4().hex[:20]
        card = api.ok(
            api.post(
                "/km/v1/softcards",
                {"name": name, "passphrase": _b64(passphrase.encode())},
                idem=new_idem(),
            )
        )
        return Card(card["id"], name, passphrase, api.activate(card["id"], passphrase.encode()))
    finally:
        api.close()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def generate(svc: Service, card: Card, mech: str, **attrs: Any) -> str:
    api = Api(svc)
    try:
        attrs = {"CKA_TOKEN": True, "CKA_PRIVATE": True, **attrs}
        r = api.post(
            f"/km/v1/softcards/{card.id}/keys/generate",
            {"mechanism": mech, "attrs": encode(attrs)},
            token=card.token,
            idem=new_idem(),
        )
        return str(api.ok(r)["handle"])
    finally:
        api.close()


def create(svc: Service, card: Card, **attrs: Any) -> str:
    api = Api(svc)
    try:
        attrs = {"CKA_TOKEN": True, "CKA_PRIVATE": True, **attrs}
        return str(api.ok(api.create(card.id, card.token, attrs))["handle"])
    finally:
        api.close()


def delete_object(svc: Service, card: Card, handle: str) -> None:
    api = Api(svc)
    try:
        r = api.delete(
            f"/km/v1/softcards/{card.id}/objects/{handle}", token=card.token, idem=new_idem()
        )
        assert r.status in (200, 204), (r.status, r.body)
    finally:
        api.close()


def card_counts(svc: Service, card_id: str) -> dict[str, Any] | None:
    api = Api(svc)
    try:
        for c in api.ok(api.get("/km/v1/softcards"))["softcards"]:
            if c["id"] == card_id:
                return dict(c)
        return None
    finally:
        api.close()


@dataclass
class SoftHSM:
    conf: Path

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(SOFTHSM2_CONF=str(self.conf), **extra)


def make_softhsm(directory: Path) -> SoftHSM:
    """A private SoftHSM2 store with one token (label t) holding a sensitive AES key and a data
    object, made through the same C ABI binding the tools use."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    env = clean_env(SOFTHSM2_CONF=str(conf))
    res = subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            HSM_LABEL,
            "--so-pin",
            HSM_SO_PIN,
            "--pin",
            HSM_PIN,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    script = f"""
from pkcs11ws import constants as C
from pkcs11ws.cli.ckabi import Library, Mechanism
with Library({SOFTHSM!r}) as lib:
    slot = [s for s in lib.slots(True) if lib.token_info(s).label == {HSM_LABEL!r}][0]
    with lib.open_session(slot, rw=True) as s:
        s.login({HSM_PIN!r}.encode())
        s.generate_key(Mechanism(C.CKM_AES_KEY_GEN), [
            (C.CKA_CLASS, C.CKO_SECRET_KEY), (C.CKA_KEY_TYPE, C.CKK_AES), (C.CKA_VALUE_LEN, 32),
            (C.CKA_TOKEN, True), (C.CKA_PRIVATE, True), (C.CKA_SENSITIVE, True),
            (C.CKA_LABEL, b"hsm-aes"), (C.CKA_ENCRYPT, True), (C.CKA_DECRYPT, True)])
        s.create_object([(C.CKA_CLASS, C.CKO_DATA), (C.CKA_TOKEN, True),
                         (C.CKA_PRIVATE, True), (C.CKA_LABEL, b"hsm-data"),
                         (C.CKA_VALUE, b"\\x01\\x02data")])
        s.logout()
"""
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return SoftHSM(conf)
