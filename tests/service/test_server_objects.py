"""Objects: data, X.509 certificates, secret keys (import and generate), attribute rules, search,
idempotency, and that no secret rests in the database in clear."""

from __future__ import annotations

import base64
import os
import time
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pkcs11ws import constants as C
from tests.support.certs import self_signed
from tests.support.service import b64, decode, encode, new_idem

CARDS = "/km/v1/softcards"


def _search(api, card, token, **attrs):
    r = api.post(f"{CARDS}/{card}/objects/search", {"attrs": encode(attrs)}, token=token)
    return [(o["handle"], decode(o["attrs"])) for o in api.ok(r)["objects"]]


def test_data_object_round_trip(api, card):
    card, token = card
    label = "<b>Ünïcödé & co</b> ✓".encode()
    app = b"app <&> \x00\xff"
    value = os.urandom(300)
    r = api.create(
        card,
        token,
        {
            "CKA_CLASS": C.CKO_DATA,
            "CKA_TOKEN": True,
            "CKA_PRIVATE": True,
            "CKA_LABEL": label,
            "CKA_APPLICATION": app,
            "CKA_OBJECT_ID": b"\x06\x03\x2a\x03\x04",
            "CKA_VALUE": value,
        },
    )
    obj = api.ok(r)
    handle = obj["handle"]
    attrs = decode(obj["attrs"])
    assert attrs["CKA_LABEL"] == label and attrs["CKA_APPLICATION"] == app
    assert attrs["CKA_VALUE"] == value
    assert attrs["CKA_TOKEN"] is True and attrs["CKA_PRIVATE"] is True
    assert attrs["CKA_CLASS"] == C.CKO_DATA
    got = decode(api.ok(api.get(f"{CARDS}/{card}/objects/{handle}", token=token))["attrs"])
    assert got == attrs
    assert [h for h, _ in _search(api, card, token, CKA_LABEL=label)] == [handle]
    assert [h for h, _ in _search(api, card, token, CKA_APPLICATION=app)] == [handle]
    assert [h for h, _ in _search(api, card, token, CKA_VALUE=value)] == [handle]
    assert _search(api, card, token, CKA_VALUE=value + b"x") == []


def test_data_object_defaults(api, card):
    card, token = card
    attrs = decode(api.ok(api.create(card, token, {"CKA_CLASS": C.CKO_DATA}))["attrs"])
    assert attrs["CKA_LABEL"] == b"" and attrs["CKA_VALUE"] == b""
    # Renaming (CKA_LABEL, CKA_ID) and copying are supported: both default to true.
    assert attrs["CKA_DESTROYABLE"] is True and attrs["CKA_MODIFIABLE"] is True
    assert attrs["CKA_COPYABLE"] is True


def test_certificate(api, card):
    card, token = card
    der, subject, issuer = self_signed()
    tmpl = {
        "CKA_CLASS": C.CKO_CERTIFICATE,
        "CKA_CERTIFICATE_TYPE": C.CKC_X_509,
        "CKA_VALUE": der,
        "CKA_SUBJECT": subject,
        "CKA_ISSUER": issuer,
        "CKA_SERIAL_NUMBER": b"\x02\x01\x07",
        "CKA_ID": b"\x01\x02",
        "CKA_LABEL": b"my cert",
        "CKA_START_DATE": b"20240101",
        "CKA_END_DATE": b"",
    }
    obj = api.ok(api.create(card, token, tmpl))
    attrs = decode(obj["attrs"])
    for k, v in tmpl.items():
        assert attrs[k] == v, k
    assert attrs["CKA_TRUSTED"] is False
    found = _search(api, card, token, CKA_CLASS=C.CKO_CERTIFICATE, CKA_ID=b"\x01\x02")
    assert [h for h, _ in found] == [obj["handle"]]
    assert api.ok(api.get(f"{CARDS}/{card}"))["certificates"] == 1


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"CKA_VALUE": b"not DER at all"}, "ATTRIBUTE_VALUE_INVALID"),
        ({"CKA_VALUE": None}, "TEMPLATE_INCOMPLETE"),
        ({"CKA_SUBJECT": None}, "TEMPLATE_INCOMPLETE"),
        ({"CKA_CERTIFICATE_TYPE": None}, "TEMPLATE_INCOMPLETE"),
        ({"CKA_CERTIFICATE_TYPE": 1}, "ATTRIBUTE_VALUE_INVALID"),
        ({"CKA_PRIVATE": False}, None),  # a public certificate
        ({"CKA_TOKEN": False}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_TRUSTED": True}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_TRUSTED": False}, None),
        ({"CKA_START_DATE": b"2024-1-1"}, "ATTRIBUTE_VALUE_INVALID"),
        ({"CKA_KEY_TYPE": C.CKK_AES}, "ATTRIBUTE_TYPE_INVALID"),
        ({"CKA_CHECK_VALUE": b"\x00\x00\x00"}, "ATTRIBUTE_VALUE_INVALID"),
    ],
)
def test_certificate_rules(api, card, change, code):
    card, token = card
    der, subject, _ = self_signed()
    tmpl = {
        "CKA_CLASS": C.CKO_CERTIFICATE,
        "CKA_CERTIFICATE_TYPE": C.CKC_X_509,
        "CKA_VALUE": der,
        "CKA_SUBJECT": subject,
    }
    for k, v in change.items():
        if v is None:
            del tmpl[k]
        else:
            tmpl[k] = v
    r = api.create(card, token, tmpl)
    if code is None:
        assert r.status == 200
    else:
        assert r.status == 400 and r.code == code, r.body


def test_imported_secret_key_attributes(api, card):
    card, token = card
    value = os.urandom(32)
    obj = api.ok(
        api.create(
            card,
            token,
            {
                "CKA_CLASS": C.CKO_SECRET_KEY,
                "CKA_KEY_TYPE": C.CKK_AES,
                "CKA_VALUE": value,
                "CKA_LABEL": b"aes",
                "CKA_ID": b"\x42",
            },
        )
    )
    attrs = decode(obj["attrs"])
    assert "CKA_VALUE" not in attrs
    enc = Cipher(algorithms.AES(value), modes.ECB()).encryptor()
    expect = {
        "CKA_CLASS": C.CKO_SECRET_KEY,
        "CKA_KEY_TYPE": C.CKK_AES,
        "CKA_VALUE_LEN": 32,
        "CKA_LABEL": b"aes",
        "CKA_ID": b"\x42",
        "CKA_TOKEN": True,
        "CKA_PRIVATE": True,
        "CKA_ENCRYPT": True,
        "CKA_DECRYPT": True,
        "CKA_SIGN": False,
        "CKA_VERIFY": False,
        "CKA_SENSITIVE": True,
        "CKA_EXTRACTABLE": False,
        "CKA_ALWAYS_SENSITIVE": False,  # imported: it was known outside before
        "CKA_NEVER_EXTRACTABLE": False,
        "CKA_LOCAL": False,
        "CKA_DERIVE": False,
        "CKA_WRAP": False,
        "CKA_UNWRAP": False,
        "CKA_KEY_GEN_MECHANISM": C.CK_UNAVAILABLE_INFORMATION,
        "CKA_CHECK_VALUE": (enc.update(bytes(16)) + enc.finalize())[:3],
    }
    for k, v in expect.items():
        assert attrs[k] == v, k
    got = decode(api.ok(api.get(f"{CARDS}/{card}/objects/{obj['handle']}", token=token))["attrs"])
    assert got == attrs
    # A secret key's value is never returned and never matched by a search.
    assert _search(api, card, token, CKA_VALUE=value) == []
    hmac_key = decode(
        api.ok(
            api.create(
                card,
                token,
                {
                    "CKA_CLASS": C.CKO_SECRET_KEY,
                    "CKA_KEY_TYPE": C.CKK_SHA384_HMAC,
                    "CKA_VALUE": b"k" * 48,
                },
            )
        )["attrs"]
    )
    assert (hmac_key["CKA_SIGN"], hmac_key["CKA_VERIFY"]) == (True, True)
    assert (hmac_key["CKA_ENCRYPT"], hmac_key["CKA_DECRYPT"]) == (False, False)
    assert hmac_key["CKA_VALUE_LEN"] == 48


_AES = {"CKA_CLASS": C.CKO_SECRET_KEY, "CKA_KEY_TYPE": C.CKK_AES, "CKA_VALUE": bytes(16)}


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"CKA_TOKEN": False}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_PRIVATE": False}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_TOKEN": True, "CKA_PRIVATE": True}, None),
        *[
            ({n: True}, "TEMPLATE_INCONSISTENT")
            for n in (
                "CKA_DERIVE",
                "CKA_EXTRACTABLE",
                "CKA_TRUSTED",
                "CKA_UNWRAP",
                "CKA_WRAP",
                "CKA_WRAP_WITH_TRUSTED",
            )
        ],
        *[({n: v}, None) for n in ("CKA_COPYABLE", "CKA_MODIFIABLE") for v in (True, False)],
        *[
            ({n: False}, None)
            for n in (
                "CKA_DERIVE",
                "CKA_EXTRACTABLE",
                "CKA_COPYABLE",
                "CKA_TRUSTED",
                "CKA_UNWRAP",
                "CKA_WRAP",
                "CKA_WRAP_WITH_TRUSTED",
            )
        ],
        # An imported key: CKA_SENSITIVE true if given; never always sensitive, never local.
        ({"CKA_SENSITIVE": False}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_SENSITIVE": True}, None),
        *[
            ({n: v}, None if v is False else "TEMPLATE_INCONSISTENT")
            for n in ("CKA_ALWAYS_SENSITIVE", "CKA_NEVER_EXTRACTABLE", "CKA_LOCAL")
            for v in (True, False)
        ],
        ({"CKA_VALUE_LEN": 16}, None),
        ({"CKA_VALUE_LEN": 32}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_VALUE": bytes(20)}, "KEY_SIZE_RANGE"),
        ({"CKA_VALUE": None}, "TEMPLATE_INCOMPLETE"),
        ({"CKA_KEY_TYPE": None}, "TEMPLATE_INCOMPLETE"),
        ({"CKA_KEY_TYPE": 0x0}, "ATTRIBUTE_VALUE_INVALID"),  # CKK_RSA
        ({"CKA_CLASS": None}, "TEMPLATE_INCOMPLETE"),
        ({"CKA_CLASS": C.CKO_PRIVATE_KEY}, "ATTRIBUTE_VALUE_INVALID"),
        ({"CKA_APPLICATION": b"x"}, "ATTRIBUTE_TYPE_INVALID"),
        ({"CKA_SIGN_RECOVER": False}, "ATTRIBUTE_TYPE_INVALID"),
        ({"CKA_DESTROYABLE": False}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_CHECK_VALUE": bytes.fromhex("000000")}, "ATTRIBUTE_VALUE_INVALID"),
        ({"CKA_CHECK_VALUE": bytes.fromhex("66e94b")}, None),  # AES-128 zero key, zero block
        ({"CKA_KEY_GEN_MECHANISM": C.CKM_AES_KEY_GEN}, "TEMPLATE_INCONSISTENT"),
    ],
)
def test_key_template_rules(api, card, extra, code):
    card, token = card
    tmpl = dict(_AES)
    for k, v in extra.items():
        if v is None:
            del tmpl[k]
        else:
            tmpl[k] = v
    r = api.create(card, token, tmpl)
    if code is None:
        assert r.status == 200, r.body
    else:
        assert r.status == 400 and r.code == code, r.body


@pytest.mark.parametrize(
    ("tmpl", "code"),
    [
        ({"CKA_CLASS": C.CKO_DATA, "CKA_SIGN": True}, "ATTRIBUTE_TYPE_INVALID"),
        ({"CKA_CLASS": C.CKO_DATA, "CKA_ID": b"x"}, "ATTRIBUTE_TYPE_INVALID"),
        ({"CKA_CLASS": C.CKO_DATA, "CKA_PRIVATE": False}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_CLASS": C.CKO_DATA, "CKA_COPYABLE": False}, None),
        ({"CKA_CLASS": C.CKO_DATA, "CKA_NO_SUCH": 1}, "ATTRIBUTE_TYPE_INVALID"),
        ({"CKA_CLASS": C.CKO_DATA, "CKA_LABEL": True}, "BAD_REQUEST"),
        ({"CKA_CLASS": C.CKO_DATA, "CKA_TOKEN": 1}, "BAD_REQUEST"),
        ({"CKA_CLASS": -1}, "BAD_REQUEST"),
        ({"CKA_CLASS": 2**64}, "BAD_REQUEST"),
        ({"CKA_CLASS": 2**64 - 1}, "ATTRIBUTE_VALUE_INVALID"),
    ],
)
def test_data_template_rules(api, card, tmpl, code):
    card, token = card
    r = api.post(
        f"{CARDS}/{card}/objects",
        {"attrs": {k: b64(v) if isinstance(v, bytes) else v for k, v in tmpl.items()}},
        token=token,
        idem=new_idem(),
    )
    if code is None:
        assert r.status == 200, r.body
    else:
        assert r.status == 400 and r.code == code, r.body


def test_bad_base64_attribute(api, card):
    card, token = card
    for bad in ("not base64!", "QUI==", "QQ", "QUJD\n", "=QUJD", "QQ==QQ=="):
        r = api.post(
            f"{CARDS}/{card}/objects",
            {"attrs": {"CKA_CLASS": 0, "CKA_VALUE": bad}},
            token=token,
            idem=new_idem(),
        )
        assert (r.status, r.code) == (400, "BAD_BASE64"), bad


def _gen(api, card, token, mech, **attrs):
    return api.post(
        f"{CARDS}/{card}/keys/generate",
        {"mechanism": mech, "attrs": encode(attrs)},
        token=token,
        idem=new_idem(),
    )


@pytest.mark.parametrize(
    ("mech", "length", "key_type", "code"),
    [
        ("CKM_AES_KEY_GEN", 16, C.CKK_AES, None),
        ("CKM_AES_KEY_GEN", 24, C.CKK_AES, None),
        ("CKM_AES_KEY_GEN", 32, C.CKK_AES, None),
        ("CKM_AES_KEY_GEN", 20, C.CKK_AES, "KEY_SIZE_RANGE"),
        ("CKM_AES_KEY_GEN", 64, C.CKK_AES, "KEY_SIZE_RANGE"),
        ("CKM_AES_KEY_GEN", None, C.CKK_AES, "TEMPLATE_INCOMPLETE"),
        ("CKM_SHA256_KEY_GEN", 1, C.CKK_SHA256_HMAC, None),
        ("CKM_SHA256_KEY_GEN", 32, C.CKK_SHA256_HMAC, None),
        ("CKM_SHA256_KEY_GEN", 1024, C.CKK_SHA256_HMAC, None),
        ("CKM_SHA256_KEY_GEN", 1025, C.CKK_SHA256_HMAC, "KEY_SIZE_RANGE"),
        ("CKM_SHA256_KEY_GEN", 0, C.CKK_SHA256_HMAC, "KEY_SIZE_RANGE"),
        ("CKM_SHA384_KEY_GEN", 48, C.CKK_SHA384_HMAC, None),
        ("CKM_SHA512_KEY_GEN", 1024, C.CKK_SHA512_HMAC, None),
        ("CKM_SHA512_KEY_GEN", 1025, C.CKK_SHA512_HMAC, "KEY_SIZE_RANGE"),
        ("CKM_SHA512_KEY_GEN", None, C.CKK_SHA512_HMAC, "TEMPLATE_INCOMPLETE"),
        ("CKM_GENERIC_SECRET_KEY_GEN", 40, C.CKK_GENERIC_SECRET, None),
        ("CKM_AES_CBC", 16, C.CKK_AES, "MECHANISM_INVALID"),
        ("CKM_NOPE", 16, C.CKK_AES, "MECHANISM_INVALID"),
    ],
)
def test_generate_key(api, card, mech, length, key_type, code):
    card, token = card
    attrs = {"CKA_LABEL": b"gen", "CKA_TOKEN": True, "CKA_PRIVATE": True}
    if length is not None:
        attrs["CKA_VALUE_LEN"] = length
    r = _gen(api, card, token, mech, **attrs)
    if code is not None:
        assert r.status == 400 and r.code == code, r.body
        return
    got = decode(api.ok(r)["attrs"])
    assert got["CKA_KEY_TYPE"] == key_type and got["CKA_VALUE_LEN"] == length
    assert got["CKA_LOCAL"] is True
    assert got["CKA_KEY_GEN_MECHANISM"] == getattr(C, mech)
    assert got["CKA_ALWAYS_SENSITIVE"] is True and got["CKA_NEVER_EXTRACTABLE"] is True
    assert "CKA_VALUE" not in got


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"CKA_KEY_TYPE": C.CKK_SHA256_HMAC}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_CLASS": C.CKO_DATA}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_VALUE": bytes(16)}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_LOCAL": False}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_LOCAL": True, "CKA_SENSITIVE": True}, None),
        ({"CKA_WRAP": True}, "TEMPLATE_INCONSISTENT"),
        ({"CKA_ENCRYPT": False, "CKA_SIGN": True}, None),
        ({"CKA_KEY_GEN_MECHANISM": C.CKM_SHA256_KEY_GEN}, "TEMPLATE_INCONSISTENT"),
    ],
)
def test_generate_key_template_rules(api, card, extra, code):
    card, token = card
    r = _gen(api, card, token, "CKM_AES_KEY_GEN", CKA_VALUE_LEN=16, **extra)
    if code is None:
        got = decode(api.ok(r)["attrs"])
        for k, v in extra.items():
            assert got[k] == v
    else:
        assert r.status == 400 and r.code == code, r.body


def test_search(api, card):
    card, token = card
    aes = api.import_key(card, token, C.CKK_AES, bytes(16), CKA_LABEL=b"k1", CKA_ID=b"\x01")
    hm = api.import_key(card, token, C.CKK_SHA256_HMAC, bytes(32), CKA_LABEL=b"k2", CKA_ID=b"\x01")
    data = api.ok(
        api.create(
            card, token, {"CKA_CLASS": C.CKO_DATA, "CKA_LABEL": b"k1", "CKA_APPLICATION": b"app"}
        )
    )["handle"]

    def handles(**attrs):
        return sorted(h for h, _ in _search(api, card, token, **attrs))

    assert handles() == sorted([aes, hm, data])
    assert handles(CKA_CLASS=C.CKO_SECRET_KEY) == sorted([aes, hm])
    assert handles(CKA_KEY_TYPE=C.CKK_AES) == [aes]
    assert handles(CKA_LABEL=b"k1") == sorted([aes, data])
    assert handles(CKA_LABEL=b"k1", CKA_CLASS=C.CKO_SECRET_KEY) == [aes]
    assert handles(CKA_ID=b"\x01", CKA_SIGN=True) == [hm]
    assert handles(CKA_APPLICATION=b"app") == [data]
    assert handles(CKA_LABEL=b"none") == []
    assert handles(CKA_CLASS=C.CKO_PRIVATE_KEY) == []
    assert handles(CKA_CLASS=2**64 - 1) == []
    assert handles(CKA_KEY_TYPE=2**63) == []
    assert handles(CKA_VALUE_LEN=32) == [hm]
    r = api.post(f"{CARDS}/{card}/objects/search", {"attrs": {"CKA_BOGUS": 1}}, token=token)
    assert (r.status, r.code) == (400, "ATTRIBUTE_TYPE_INVALID")
    # Another card's objects are not visible.
    other, other_token = api.new_card()
    assert _search(api, other, other_token) == []


def test_get_and_delete_object(api, card):
    card, token = card
    h = api.import_key(card, token, C.CKK_AES, bytes(16))
    path = f"{CARDS}/{card}/objects/{h}"
    assert api.get(path, token=token).status == 200
    key = new_idem()
    first = api.delete(path, token=token, idem=key)
    assert first.status == 200
    assert api.delete(path, token=token, idem=key).body == first.body  # replayed, not 404
    for r in (api.get(path, token=token), api.delete(path, token=token, idem=new_idem())):
        assert (r.status, r.code) == (404, "OBJECT_NOT_FOUND")
    r = api.get(f"{CARDS}/{card}/objects/{uuid.uuid4()}", token=token)
    assert r.code == "OBJECT_NOT_FOUND"
    r = api.get(f"{CARDS}/{card}/objects/search", token=token)
    assert r.code == "OBJECT_NOT_FOUND"
    r = api.get(path)
    assert r.code == "NOT_ACTIVATED"


def test_idempotent_create_object(api, card):
    card, token = card
    body = {
        "attrs": encode(
            {
                "CKA_CLASS": C.CKO_SECRET_KEY,
                "CKA_KEY_TYPE": C.CKK_AES,
                "CKA_VALUE": bytes(range(16)),
                "CKA_LABEL": b"once",
            }
        )
    }
    key = new_idem()
    path = f"{CARDS}/{card}/objects"
    first = api.post(path, body, token=token, idem=key)
    second = api.post(path, body, token=token, idem=key)
    assert first.status == second.status == 200 and first.body == second.body
    assert len(_search(api, card, token, CKA_LABEL=b"once")) == 1
    body["attrs"]["CKA_LABEL"] = b64(b"twice")
    r = api.post(path, body, token=token, idem=key)
    assert (r.status, r.code) == (422, "IDEMPOTENCY_CONFLICT")
    assert _search(api, card, token, CKA_LABEL=b"twice") == []
    r = api.post(path, body, token=token)
    assert (r.status, r.code) == (400, "IDEMPOTENCY_KEY_REQUIRED")


def test_idempotent_generate_key(api, card):
    card, token = card
    body = {
        "mechanism": "CKM_AES_KEY_GEN",
        "attrs": encode({"CKA_VALUE_LEN": 32, "CKA_LABEL": b"gen-once"}),
    }
    key = new_idem()
    path = f"{CARDS}/{card}/keys/generate"
    first = api.post(path, body, token=token, idem=key)
    second = api.post(path, body, token=token, idem=key)
    assert first.status == 200 and first.body == second.body
    assert len(_search(api, card, token, CKA_LABEL=b"gen-once")) == 1
    assert (
        api.post(path, {**body, "mechanism": "CKM_SHA256_KEY_GEN"}, token=token, idem=key).code
        == "IDEMPOTENCY_CONFLICT"
    )


def test_no_secret_rests_in_clear(service, api):
    passphrase = b"Pp-" + os.urandom(12).hex().encode()
    card, token = api.new_card(passphrase)
    key_bytes = os.urandom(32)
    data_value = b"DATA-" + os.urandom(40)
    cert_der, subject, _ = self_signed("cleartext check")
    api.import_key(card, token, C.CKK_AES, key_bytes)
    api.import_key(card, token, C.CKK_SHA512_HMAC, key_bytes[:24] + b"hmac-key-tail")
    api.ok(api.create(card, token, {"CKA_CLASS": C.CKO_DATA, "CKA_VALUE": data_value}))
    api.ok(
        api.create(
            card,
            token,
            {
                "CKA_CLASS": C.CKO_CERTIFICATE,
                "CKA_SUBJECT": subject,
                "CKA_CERTIFICATE_TYPE": C.CKC_X_509,
                "CKA_VALUE": cert_der,
            },
        )
    )
    api.new_card(passphrase)  # a second card with the same passphrase: a different salt
    time.sleep(0.2)
    files = [service.dir / n for n in ("keys.db", "keys.db-wal", "keys.db-shm")]
    blob = b"".join(f.read_bytes() for f in files if f.exists())
    assert len(blob) > 4096
    needles = {
        "key": key_bytes,
        "key prefix": key_bytes[:16],
        "hmac key": key_bytes[:24],
        "data": data_value,
        "data tail": data_value[5:29],
        "passphrase": passphrase,
        "certificate": cert_der[-64:],
    }
    for what, secret in needles.items():
        forms = [secret, base64.b64encode(secret), secret.hex().encode()]
        for form in forms:
            assert form not in blob, f"{what} found in the database"
    log = service.log_text().encode()
    for what, secret in needles.items():
        assert secret not in log and base64.b64encode(secret) not in log, what
    # The search itself is meaningful: the non-secret label of a key is there in clear.
    api.import_key(card, token, C.CKK_AES, bytes(16), CKA_LABEL=b"visible-label-xyz")
    time.sleep(0.1)
    blob = b"".join(f.read_bytes() for f in files if f.exists())
    assert base64.b64encode(b"visible-label-xyz") in blob
