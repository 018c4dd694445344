"""The key service's operation families where they take a shortcut of their own: HMAC from
the key's pad states (ops/hmac.py, compiled in server/_hot.pyx), ECDSA's r || s read from
OpenSSL's DER (ops/ec.py) and the decoders' compiled base64, each checked against the general
computation it replaces."""

from __future__ import annotations

import base64
import hmac
import os
import random
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from pkcs11ws.mechanisms import by_name
from pkcs11ws.protocol import canonical_b64
from pkcs11ws.server._hot import (
    HmacState,
    b64_canonical,
    mac_answer,
    mac_equals,
    mac_run,
    scan_batch,
    scan_run,
    scan_single,
    verify_run,
)
from pkcs11ws.server.ops import ec as ec_ops
from pkcs11ws.server.ops import hmac as hmac_ops


@pytest.mark.parametrize("name", ["sha1", "sha224", "sha256", "sha384", "sha512"])
def test_hmac_from_pads_is_hmac(name: str) -> None:
    # Keys shorter than, as long as, and longer than the hash's block (64 or 128 bytes).
    for size in (0, 1, 32, 64, 65, 128, 129, 300):
        value = os.urandom(size)
        key = hmac_ops.load(value)
        assert key == value and len(key) == size  # the service's size checks use len()
        for data in (b"", os.urandom(1), os.urandom(1000)):
            assert hmac_ops._mac(key, name, data) == hmac.digest(value, data, name)


@pytest.mark.parametrize(
    ("curve", "n"), [(ec.SECP256R1(), 32), (ec.SECP384R1(), 48), (ec.SECP521R1(), 66)]
)
def test_raw_signature_is_r_and_s(curve: ec.EllipticCurve, n: int) -> None:
    def want(der: bytes) -> bytes:
        r, s = utils.decode_dss_signature(der)
        return r.to_bytes(n, "big") + s.to_bytes(n, "big")

    key = ec.generate_private_key(curve)
    for _ in range(200):
        der = key.sign(os.urandom(32), ec.ECDSA(hashes.SHA256()))
        assert ec_ops.raw_signature(der, n) == want(der)
    # Short and full-width values (leading zero bytes dropped or added by DER).
    top = 2 ** (8 * n) - 1
    for r, s in ((1, 1), (0, 5), (2**255, 3), (top, top), (top >> 8, 1 << 8)):
        der = utils.encode_dss_signature(r, s)
        assert ec_ops.raw_signature(der, n) == want(der)


def test_compiled_base64_is_canonical_b64() -> None:
    # Every length up to a few blocks, each valid spelling and single-byte corruptions of it,
    # and the non-canonical spellings a2b_base64's strict mode lets through.
    rng = random.Random(15)
    for n in range(40):
        for _ in range(30):
            value = os.urandom(n)
            text = base64.b64encode(value)
            assert b64_canonical(text) == value
            spoilt = bytearray(text + b"A" * (n == 0))
            spoilt[rng.randrange(len(spoilt))] = rng.randrange(256)
            want = canonical_b64(bytes(spoilt).decode("latin-1"))
            assert b64_canonical(bytes(spoilt)) == want
    for text in (b"QUJD====", b"QUJ=", b"QUI=", b"QR==", b"QQ==", b"====", b"A===", b"AB==",
                 b"=", b"QUJD\n", b"QU=D", b"Q===", b"QUJDRA", b"-_-_"):  # fmt: skip
        assert b64_canonical(text) == canonical_b64(text.decode()), text


def test_hmac_state_cleans_nothing_shared() -> None:
    # Two keys' states are independent, and a state keeps giving the same MAC (the pads are
    # copied per MAC, never updated in place).
    a, b = hmac_ops.load(b"a" * 32), hmac_ops.load(b"b" * 32)
    first = hmac_ops._mac(a, "sha256", b"data")
    assert hmac_ops._mac(b, "sha256", b"data") == hmac.digest(b"b" * 32, b"data", "sha256")
    assert hmac_ops._mac(a, "sha256", b"data") == first == hmac.digest(a, b"data", "sha256")
    with pytest.raises(ValueError, match="no HMAC hash"):
        HmacState("md5", b"k")


def test_mac_run_answers_while_its_time_holds() -> None:
    key = os.urandom(32)
    state = HmacState("sha256", key)
    values: list[object] = [b"", b"a", os.urandom(100), "not bytes", b"b"]
    parts: list[bytes] = []

    def part(v: bytes) -> bytes:
        return b"<" + base64.b64encode(hmac.digest(key, v, "sha256")) + b">"

    far = time.time() + 3600
    assert mac_run(state, values, 0, far, b"<", b">", parts) == 3  # stops at the str
    assert parts == [part(v) for v in values[:3]]  # type: ignore[arg-type]
    assert mac_run(state, values, 4, far, b"<", b">", parts) == 5
    assert parts[-1] == part(b"b") and len(parts) == 4
    assert mac_run(state, values, 0, time.time() - 1, b"<", b">", parts) == 0  # time is up
    assert len(parts) == 4
    assert state(b"x") == state.mac(b"x") == hmac.digest(key, b"x", "sha256")


def test_verify_run_answers_only_full_matching_macs() -> None:
    key = os.urandom(32)
    state = HmacState("sha256", key)
    good = [(d, hmac.digest(key, d, "sha256")) for d in (b"", b"a", os.urandom(100))]
    wrong = (b"a", bytes([good[1][1][0] ^ 1]) + good[1][1][1:])  # one bit off
    short = (b"a", good[1][1][:16])  # a truncated MAC: its length is the full path's to refuse
    far = time.time() + 3600
    for odd in (wrong, short, (b"a", "not bytes"), (b"a",), [b"a", good[1][1]], b"a"):
        values: list[object] = [*good, odd, good[0]]
        parts: list[bytes] = []
        assert verify_run(state, values, 0, far, b"ok", parts) == 3, odd
        assert parts == [b"ok"] * 3
        assert verify_run(state, values, 4, far, b"ok", parts) == 5
        assert len(parts) == 4
    parts = []
    assert verify_run(state, list(good), 0, time.time() - 1, b"ok", parts) == 0  # time is up
    assert parts == []
    # Another key's MAC never passes.
    other = HmacState("sha256", os.urandom(32))
    assert verify_run(other, list(good), 0, far, b"ok", parts) == 0


def test_hmac_direct_is_the_full_mac_for_verify_too() -> None:
    key = hmac_ops.load(os.urandom(32))
    for name, op in (("CKM_SHA256_HMAC", "sign"), ("CKM_SHA384_HMAC", "verify")):
        mech = by_name(name)
        assert mech is not None
        state = hmac_ops.direct(mech, key, op)
        assert isinstance(state, HmacState) and state.size == mech.out_len
        assert state(b"x") == hmac.digest(key, b"x", mech.digest)
    general = by_name("CKM_SHA256_HMAC_GENERAL")
    assert general is not None and hmac_ops.direct(general, key, "verify") is None


def test_scan_run_takes_two_trailing_values() -> None:
    last = (("data", b64_canonical, 0), ("signature", b64_canonical, 4))
    mids = (b'","signature":"',)
    head = b'{"op":"verify","request":{"key":"k","data":"'
    item = head + b'QQ==","signature":"QUI="}}'
    raw = b"[" + item + b"," + item.replace(b"QQ==", b"QUJD") + b"]"
    values: list[object] = []
    assert scan_run(raw, 1, head, len(raw) - 1, last, mids, values) == -2
    assert values == [(b"A", b"AB"), (b"ABC", b"AB")]
    for odd, want in (
        (b'QQ==","signature":"QR=="}}', -1),  # non-canonical base64: the generic path
        (b'QQ==","signature":"QUJDREU="}}', -1),  # over max_len
        (b'QQ==","signatur":"QUI="}}', 1),  # another field: decoded in full
        (b'QQ==","signature":"QUI=","mac_length":16}}', 1),
        (b'QQ==","signature":"QUI="}', -1),  # no item brace
        (b'QQ=="}}', 1),
    ):
        values = []
        raw = b"[" + head + odd + b"]"
        assert scan_run(raw, 1, head, len(raw) - 1, last, mids, values) == want, odd
        assert values == [] or want == -1


def test_scan_single_reads_only_a_repeated_body() -> None:
    allowed = bytes(c in b"abc-" for c in range(256))
    last = (("data", b64_canonical, 0), ("signature", b64_canonical, 3))
    mids = (b'","signature":"',)
    head, rest = b'{"id":"', b'","key":"k","data":"'
    good = head + b"ab-c" + rest + b'QQ==","signature":"QUI="}'
    assert scan_single(good, head, rest, last, mids, allowed, 4) == ("ab-c", (b"A", b"AB"))
    one = head + b"a" + rest + b'QQ=="}'
    assert scan_single(one, head, rest, last[:1], (), allowed, 4) == ("a", b"A")
    for odd in (
        good.replace(b"ab-c", b"ab-cc"),  # an id over rid_max
        good.replace(b"ab-c", b""),  # an empty id
        good.replace(b"ab-c", b"ab d"),  # a byte the table refuses
        good.replace(b'"key":"k"', b'"key":"j"'),  # not rest
        good.replace(b"QQ==", b"QR=="),  # non-canonical base64
        good.replace(b"QUI=", b"QUJDRA=="),  # over max_len
        good + b" ",  # anything after the closing brace
        good[:-1],
        good.replace(b'","signature', b'", "signature'),
        good.replace(b'QUI="}', b'QUI=","mac_length":16}'),
        head + b"ab",
        b"",
    ):
        assert scan_single(odd, head, rest, last, mids, allowed, 4) is None, odd
    with pytest.raises(ValueError, match="one byte per byte value"):
        scan_single(good, head, rest, last, mids, b"", 4)


def test_mac_answer_and_mac_equals_are_hmac() -> None:
    key = os.urandom(32)
    state = HmacState("sha256", key)
    for data in (b"", b"x", os.urandom(1000)):
        mac = hmac.digest(key, data, "sha256")
        assert mac_answer(state, data, b"<", b">") == b"<" + base64.b64encode(mac) + b">"
        assert mac_equals(state, data, mac) is True
        assert mac_equals(state, data, bytes([mac[0] ^ 1]) + mac[1:]) is False
        assert mac_equals(state, data, mac[:16]) is False
        assert mac_equals(state, data, mac + b"\x00") is False
        assert mac_equals(state, data + b"!", mac) is False


def test_scan_batch_takes_only_one_whole_run() -> None:
    allowed = bytes(c in b"abc-" for c in range(256))
    last = (("data", b64_canonical, 0),)
    bare, rid_head, rid_tail = b'{"items":[', b'{"id":"', b'","items":['
    head = b'{"op":"sign","request":{"key":"k","data":"'
    item = head + b'QQ=="}}'
    args = (bare, rid_head, rid_tail, allowed, 4, head, last, ())

    def scan(raw: bytes) -> tuple[object, list[object]]:
        values: list[object] = []
        return scan_batch(raw, *args, values), values

    assert scan(bare + item + b"," + item.replace(b"QQ==", b"") + b"]}") == ((None,), [b"A", b""])
    assert scan(rid_head + b"ab" + rid_tail + item + b"]}") == (("ab",), [b"A"])
    for odd in (
        bare + b"]}",  # no item
        bare + item + b"," + item.replace(b'"k"', b'"j"') + b"]}",  # an item off the run
        bare + item + b"," + item + b",]}",
        bare + item + b"]} ",
        bare + item + b"}",
        bare + item.replace(b"QQ==", b"QR==") + b"]}",  # non-canonical base64
        rid_head + b"a b" + rid_tail + item + b"]}",  # a byte the table refuses
        rid_head + b"abcab" + rid_tail + item + b"]}",  # over rid_max
        rid_head + rid_tail + item + b"]}",  # an empty id
        b'{"items":[ ' + item + b"]}",
    ):
        assert scan(odd)[0] is None, odd
