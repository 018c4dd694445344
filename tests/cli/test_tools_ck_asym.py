"""cklist-dynamic and ckmechinfo with key pairs: the public key listed before login, the private
key after it with its components sensitive, and the key pair mechanisms with their bit sizes."""

from __future__ import annotations

from typing import Any

import pytest

from pkcs11ws import constants as C
from tests.cli.test_tools_ck import blocks
from tests.support.service import Api, encode, new_idem
from tests.support.tools_util import Card, activated_card, service_env, tool


@pytest.fixture(scope="module")
def pair_card(service: Any) -> Card:
    c = activated_card(service)
    api = Api(service)
    try:
        r = api.post(
            f"/km/v1/softcards/{c.id}/keys/generate-pair",
            {
                "mechanism": "CKM_RSA_PKCS_KEY_PAIR_GEN",
                "public_attrs": encode({"CKA_MODULUS_BITS": 2048, "CKA_LABEL": b"pair"}),
                "private_attrs": encode({"CKA_LABEL": b"pair", "CKA_ID": b"\x07"}),
            },
            token=c.token,
            idem=new_idem(),
        )
        api.ok(r)
    finally:
        api.close()
    return c


def test_cklist_key_pair_before_and_after_login(service: Any, pair_card: Card) -> None:
    res = tool("cklist", "--token-label", pair_card.name, env=service_env(service))
    assert res.returncode == 0, res.stderr
    objs = blocks(res.stdout)
    assert list(objs) == ['CKO_PUBLIC_KEY "pair"']
    pub = objs['CKO_PUBLIC_KEY "pair"']
    assert "CKA_KEY_TYPE CKK_RSA" in pub and "CKA_MODULUS_BITS 2048" in pub
    assert "CKA_PRIVATE false" in pub and "CKA_KEY_GEN_MECHANISM CKM_RSA_PKCS_KEY_PAIR_GEN" in pub
    res = tool(
        "cklist",
        "--token-label",
        pair_card.name,
        "--login",
        env=service_env(service),
        stdin=pair_card.passphrase + "\n",
    )
    assert res.returncode == 0, res.stderr
    priv = blocks(res.stdout)['CKO_PRIVATE_KEY "pair"']
    assert "CKA_SENSITIVE true" in priv and "CKA_EXTRACTABLE false" in priv
    assert "CKA_PRIVATE_EXPONENT <sensitive>" in priv and "CKA_PRIME_1 <sensitive>" in priv
    assert "CKA_SIGN true" in priv and "CKA_ID 07" in priv


def test_ckmechinfo_shows_key_pair_mechanisms(service: Any, pair_card: Card) -> None:
    res = tool("ckmechinfo", env=service_env(service))
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines() if "0x" in line}
    for name, lo, hi in (
        ("CKM_RSA_PKCS_KEY_PAIR_GEN", "2048", "4096"),
        ("CKM_SHA256_RSA_PKCS_PSS", "2048", "4096"),
        ("CKM_EC_KEY_PAIR_GEN", "256", "521"),
        ("CKM_ECDSA_SHA384", "256", "521"),
        ("CKM_AES_GCM", "16", "32"),
    ):
        assert name in rows, res.stdout
        assert rows[name][2:4] == [lo, hi], rows[name]
        assert f"0x{getattr(C, name):08X}" in rows[name]
