"""The shared schema: strict decoding, encode/decode round trips, generated docs are current."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkcs11ws import constants as C
from pkcs11ws import protocol as P
from pkcs11ws.protocol_docs import markdown, openapi

ROOT = Path(__file__).resolve().parents[2]


def test_docs_protocol_md_is_generated_from_schema() -> None:
    committed = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert committed == markdown(), "run: python -m pkcs11ws.protocol_docs > docs/protocol.md"


def test_every_endpoint_and_error_is_documented() -> None:
    doc = markdown()
    for ep in P.ENDPOINTS:
        assert ep.path in doc
        for code in ep.errors:
            assert code in P.ERRORS, f"{ep.op} names unknown error {code}"
    for code in P.ERRORS:
        assert f"`{code}`" in doc
    spec = openapi()
    assert {op["operationId"] for ops in spec["paths"].values() for op in ops.values()} == {
        ep.op for ep in P.ENDPOINTS
    }


def test_attribute_table_matches_constants() -> None:
    for a in P.ATTRIBUTES:
        assert getattr(C, a.name) == a.code
    assert len(P.ATTR_BY_CODE) == len(P.ATTRIBUTES)


def test_errors_map_to_consumer_ckrs() -> None:
    assert P.ckr_for("PASSPHRASE_INCORRECT") == C.CKR_PIN_INCORRECT
    assert P.ckr_for("NOT_ACTIVATED") == C.CKR_USER_NOT_LOGGED_IN
    assert P.ckr_for("SIGNATURE_INVALID") == C.CKR_SIGNATURE_INVALID
    assert P.ckr_for("KEY_NOT_FOUND") == C.CKR_KEY_HANDLE_INVALID
    # unknown codes fall back on the HTTP status (design.md section 4)
    assert P.ckr_for("", 401) == C.CKR_USER_NOT_LOGGED_IN
    assert P.ckr_for("", 404) == C.CKR_OBJECT_HANDLE_INVALID
    assert P.ckr_for("", 502) == C.CKR_DEVICE_ERROR
    assert P.ckr_for("", 418) == C.CKR_ARGUMENTS_BAD


def test_decode_rejects_unknown_fields_and_bad_base64() -> None:
    sign = P.STRUCTS["Sign"]
    ok = {"key": "k", "mechanism": "CKM_SHA256_HMAC", "data": "AAEC"}
    assert P.decode(sign, ok)["data"] == b"\x00\x01\x02"
    with pytest.raises(P.ProtocolError) as e:
        P.decode(sign, {**ok, "extra": 1})
    assert e.value.code == "UNKNOWN_FIELD"
    for bad in ("AAE", "AA=C", "A AEC", "AAEC\n", "@@@@", "QUJD=", "QUJD===="):
        with pytest.raises(P.ProtocolError) as e:
            P.decode(sign, {**ok, "data": bad})
        assert e.value.code == "BAD_BASE64", bad
    with pytest.raises(P.ProtocolError) as e:
        P.decode(sign, {"key": "k", "data": "AAEC"})
    assert e.value.code == "BAD_REQUEST"
    with pytest.raises(P.ProtocolError):
        P.decode(sign, {**ok, "mac_length": -1})
    with pytest.raises(P.ProtocolError):
        P.decode(sign, {**ok, "mac_length": True})
    with pytest.raises(P.ProtocolError):
        P.decode(sign, [ok])


def test_passphrase_length_limit_has_its_own_code() -> None:
    with pytest.raises(P.ProtocolError) as e:
        P.decode(P.STRUCTS["Activate"], {"passphrase": P.b64e(b"x" * 257)})
    assert e.value.code == "PASSPHRASE_LEN_RANGE"


def test_attrs_decoding_is_typed() -> None:
    got = P.decode_attrs({"CKA_TOKEN": True, "CKA_CLASS": 4, "CKA_LABEL": P.b64e(b"<a&b>\xc3\xa9")})
    assert got == {"CKA_TOKEN": True, "CKA_CLASS": 4, "CKA_LABEL": b"<a&b>\xc3\xa9"}
    for bad in ({"CKA_TOKEN": 1}, {"CKA_CLASS": "4"}, {"CKA_CLASS": True}, {"CKA_NOPE": 1}):
        with pytest.raises(P.ProtocolError):
            P.decode_attrs(bad)


_attr_values = st.one_of(
    *(
        st.fixed_dictionaries(
            {a.name: st.booleans()}
            if a.kind == P.BOOL
            else {a.name: st.integers(0, 2**64 - 1)}
            if a.kind == P.ULONG
            else {a.name: st.lists(st.integers(0, 2**64 - 1), max_size=8).map(tuple)}
            if a.kind == P.ULONGS
            else {a.name: st.binary(max_size=64)}
        )
        for a in P.ATTRIBUTES
    )
)


@given(st.lists(_attr_values, max_size=6))
def test_attrs_round_trip(parts: list[dict[str, object]]) -> None:
    attrs: dict[str, object] = {}
    for p in parts:
        attrs.update(p)
    assert P.decode_attrs(P.encode_attrs(attrs)) == attrs  # type: ignore[arg-type]


@given(data=st.binary(max_size=512), key=st.text(max_size=40), n=st.integers(0, 2**64 - 1))
def test_struct_round_trip(data: bytes, key: str, n: int) -> None:
    s = P.STRUCTS["Verify"]
    values = {
        "key": key,
        "mechanism": "CKM_SHA256_HMAC",
        "data": data,
        "signature": data[:32],
        "mac_length": n,
    }
    assert P.decode(s, P.encode(s, values)) == values


def test_path_for_and_patterns() -> None:
    assert P.path_for("activate", card="abc-1") == "/km/v1/softcards/abc-1/activate"
    m = P.ENDPOINT_BY_OP["get_object"].pattern.match("/km/v1/softcards/c1/objects/h-2")
    assert m is not None and m.groupdict() == {"card": "c1", "handle": "h-2"}
    assert P.ENDPOINT_BY_OP["get_object"].pattern.match("/km/v1/softcards/c1/objects/../x") is None


def test_canonical_b64_matches_the_reencode_rule():
    """canonical_b64 (length and trailing-bit checks) accepts exactly what decoding then
    encoding again and comparing accepts: every length 0..7, every last character, extra
    padding, whitespace and foreign characters."""
    import binascii
    import itertools

    def by_reencoding(text: str) -> bytes | None:
        try:
            data = binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError):
            return None
        return data if binascii.b2a_base64(data, newline=False).decode() == text else None

    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    cases = [""]
    for n in range(1, 8):
        base = binascii.b2a_base64(bytes(range(7, 7 + n)), newline=False).decode()
        stem = base.rstrip("=")
        pad = base[len(stem) :]
        cases += [stem[:-1] + c + pad for c in alphabet]  # every last data character
        cases += [base + "=", base + "==", base + "====", stem, base + "\n", " " + base]
    cases += ["QUJD====", "QQ=A", "Q===", "é" * 4, "AAECAx=="]
    cases += ["".join(p) for p in itertools.product("AQ=", repeat=4)]
    for text in cases:
        assert P.canonical_b64(text) == by_reencoding(text), text


# Each entry point into the error and attribute tables, first in a fresh interpreter: they are
# built on first use (pkcs11-tool -L never reads them), whichever read comes first.
_FIRST_READS = {
    "ckr_for": "assert P.ckr_for('PASSPHRASE_INCORRECT') == C.CKR_PIN_INCORRECT",
    "from_import": "from pkcs11ws.protocol import ERRORS; assert ERRORS is P.ERRORS",
    "by_code": "assert P.ATTR_BY_CODE[C.CKA_LABEL] is P.ATTR_BY_NAME['CKA_LABEL']",
    "decode_attrs": "assert P.decode_attrs({'CKA_TOKEN': True}) == {'CKA_TOKEN': True}",
    "encode_attrs": "assert P.encode_attrs({'CKA_ID': b'ab'}) == {'CKA_ID': 'YWI='}",
    "attributes": "assert P.ATTRIBUTES[0] is P.ATTR_BY_NAME['CKA_CLASS']",
}


@pytest.mark.parametrize("first", sorted(_FIRST_READS))
def test_error_and_attribute_tables_are_built_on_first_use(first: str) -> None:
    import subprocess
    import sys

    code = (
        "from pkcs11ws import protocol as P, constants as C\n"
        "tables = ('ERRORS', 'ATTRIBUTES', 'ATTR_BY_NAME', 'ATTR_BY_CODE')\n"
        "assert [t for t in tables if t in vars(P)] == [], 'built at import'\n"
        f"{_FIRST_READS[first]}\n"
        "assert len(P.ATTR_BY_CODE) == len(P.ATTRIBUTES) == len(P.ATTR_BY_NAME) > 50\n"
        "assert P.ERRORS['INTERNAL'].http == 500 and len(P.ERRORS) > 30\n"
        "try:\n"
        "    P.NO_SUCH_TABLE\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('a missing name must stay an AttributeError')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
