"""The fast request decoder (server/fastjson.py) accepts only what the generic strict path
accepts, and decodes it to the same values; the clients' own bodies take it.

Compared on hand-picked spellings an attacker would try (duplicate and unknown fields,
escapes, whitespace, non-canonical base64, leading zeros, values over a limit, trailing
bytes) and on thousands of random mutations of real request bodies, single and batched.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from pkcs11ws import protocol
from pkcs11ws.protocol import ProtocolError
from pkcs11ws.server import fastjson
from pkcs11ws.server.app import decode_generic, decode_obj

TOKEN = "v1.AbCd-_xyz0123456789"
KEY = "6f1c2a3e-1111-2222-3333-444455556666"

VALID: dict[str, list[bytes]] = {
    "Sign": [
        b'{"key":"%s","mechanism":"CKM_SHA256_HMAC","data":"AAECAwQFBgc="}' % KEY.encode(),
        b'{"key":"k","mechanism":"CKM_SHA256_HMAC_GENERAL","data":"","mac_length":16}',
        b'{"key":"k","mechanism":"CKM_SHA256_RSA_PKCS_PSS","data":"QQ==","hash":"sha256",'
        b'"mgf":"sha256","salt_length":32}',
    ],
    "Verify": [b'{"key":"k","mechanism":"CKM_SHA256_HMAC","data":"QUI=","signature":"QUJD"}'],
    "Cipher": [
        b'{"key":"k","mechanism":"CKM_AES_CBC","data":"QUJD","iv":"AAAAAAAAAAAAAAAAAAAAAA=="}',
        b'{"key":"k","mechanism":"CKM_AES_GCM","data":"","iv":"AAAAAAAAAAAAAAAA","aad":"QQ==",'
        b'"tag_bits":128}',
    ],
    "Random": [b'{"length":32}', b'{"length":0}', b'{"length":18446744073709551615}'],
    "Activate": [b'{"passphrase":"c2VjcmV0"}'],
    "SoftcardCreate": [b'{"name":"card1","passphrase":"c2VjcmV0c2VjcmV0"}'],
}

TRICKS: dict[str, list[bytes]] = {
    "Sign": [
        b'{"key":"a","key":"b","mechanism":"m","data":"QQ=="}',  # duplicate
        b'{"key":"a","mechanism":"m","data":"QQ==","data":"QQ=="}',
        b'{"key":"a","mechanism":"m","data":"QQ==","extra":"x"}',  # unknown
        b'{"mechanism":"m","key":"a","data":"QQ=="}',  # another order: generic path
        b'{ "key":"a","mechanism":"m","data":"QQ=="}',
        b'{"key":"a\\u0041","mechanism":"m","data":"QQ=="}',  # an escape
        b'{"key":"\xc3\xa9","mechanism":"m","data":"QQ=="}',  # non-ASCII
        b'{"key":"a","mechanism":"m","data":"QR=="}',  # non-canonical base64
        b'{"key":"a","mechanism":"m","data":"QQ==="}',
        b'{"key":"a","mechanism":"m","data":"QQ"}',
        b'{"key":"a","mechanism":"m","data":"QQ==","mac_length":016}',
        b'{"key":"a","mechanism":"m","data":"QQ==","mac_length":-1}',
        b'{"key":"a","mechanism":"m","data":"QQ==","mac_length":1.0}',
        b'{"key":"a","mechanism":"m","data":"QQ==","mac_length":true}',
        b'{"key":"a","mechanism":"m","data":"QQ==","mac_length":18446744073709551616}',
        b'{"key":"a","mechanism":"m","data":"QQ=="}x',
        b'{"key":"a","mechanism":"m","data":"QQ=="}\n',
        b'{,"key":"a","mechanism":"m","data":"QQ=="}',
        b'{"key":"a",,"mechanism":"m","data":"QQ=="}',
        b'{"key":"a","mechanism":"m","data":"QQ==",}',
        b'{"key":"a","mechanism":"m"}',
        b'{"key":1,"mechanism":"m","data":"QQ=="}',
        b'\xef\xbb\xbf{"key":"a","mechanism":"m","data":"QQ=="}',
    ],
    "Activate": [b'{"passphrase":"' + b"QUFB" * 90 + b'"}'],  # over MAX_PASSPHRASE
    "SoftcardCreate": [b'{"name":"' + b"n" * 65 + b'","passphrase":"c2VjcmV0c2VjcmV0"}'],
    "Random": [b'{"length":"5"}', b'{"length":null}', b"{}"],
}


def _generic(struct: str, raw: bytes) -> dict[str, Any] | None:
    try:
        return decode_generic(struct, raw)
    except ProtocolError:
        return None


def _agrees(struct: str, raw: bytes) -> bool:
    """fast(raw) is None, or the generic path accepts raw with the very same values."""
    fast = fastjson.decoder(struct)
    assert fast is not None
    got = fast(raw)
    return got is None or got == _generic(struct, raw)


def _mutations(raw: bytes, rng: random.Random, n: int) -> list[bytes]:
    alphabet = b'{}[]",:\\ 0123456789aeflnrstuAQ=+/-_.\xc3\xa9\x00'
    out = []
    for _ in range(n):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b) + 1)
            kind = rng.randrange(4)
            if kind == 0 and i < len(b):
                del b[i]
            elif kind == 1:
                b.insert(i, rng.choice(alphabet))
            elif kind == 2 and i < len(b):
                b[i] = rng.choice(alphabet)
            elif i < len(b):  # duplicate a slice (a field twice, a value twice)
                j = rng.randrange(i, min(len(b), i + 24) + 1)
                b[i:i] = b[i:j]
        out.append(bytes(b))
    return out


def test_valid_bodies_take_the_fast_path_with_the_same_values() -> None:
    for struct, bodies in VALID.items():
        fast = fastjson.decoder(struct)
        assert fast is not None, struct
        for raw in bodies:
            got = fast(raw)
            assert got is not None, raw
            assert got == decode_generic(struct, raw), raw


@pytest.mark.parametrize("struct", sorted(TRICKS))
def test_tricks_are_left_to_the_generic_path(struct: str) -> None:
    fast = fastjson.decoder(struct)
    assert fast is not None
    for raw in TRICKS[struct]:
        assert fast(raw) is None, raw


def test_random_mutations_agree_with_the_generic_path() -> None:
    rng = random.Random(15)
    taken = 0
    for struct, bodies in VALID.items():
        for raw in bodies:
            for m in _mutations(raw, rng, 1500):
                assert _agrees(struct, m), (struct, m)
                taken += fastjson.decoder(struct)(m) is not None  # type: ignore[misc]
    assert taken > 100  # mutations that stay valid (another base64 letter...) still go fast


def _batch_body(items: list[tuple[str, str | None, bytes]]) -> bytes:
    parts = []
    for op, token, request in items:
        tok = b"" if token is None else b',"token":' + json.dumps(token).encode()
        parts.append(b'{"op":"' + op.encode() + b'"' + tok + b',"request":' + request + b"}")
    return b'{"items":[' + b",".join(parts) + b"]}"


def _fast_batch(raw: bytes) -> list[tuple[str, str | None, dict[str, Any]]] | None:
    """fastjson.batch's runs as items (each its own dict), or None."""
    found = fastjson.batch(raw)
    if found is None:
        return None
    rid, runs = found
    assert rid is None and fastjson.count(runs) == len(fastjson.items(runs))
    return fastjson.items(runs)


def _batch_generic(raw: bytes) -> list[tuple[str, str | None, dict[str, Any]]] | None:
    """What the generic path makes of a batch whose every item would decode: else None."""
    try:
        items = decode_generic("Batch", raw)["items"]
        out = []
        for it in items:
            op = it["op"]
            if op not in protocol.BATCHABLE:
                return None
            ep = protocol.ENDPOINT_BY_OP[op]
            out.append((op, it.get("token"), decode_obj(ep.request, it["request"])))
        return out
    except ProtocolError:
        return None


def test_batches_agree_with_the_generic_path() -> None:
    sign, rnd = VALID["Sign"][0], VALID["Random"][0]
    good = _batch_body([("sign", TOKEN, sign), ("random", None, rnd), ("sign", TOKEN, sign)])
    assert _fast_batch(good) == _batch_generic(good) is not None
    assert _fast_batch(b'{"items":[]}') == []
    off = [
        _batch_body([("sign", TOKEN, sign), ("create_object", TOKEN, b'{"attrs":{}}')]),
        _batch_body([("sign", TOKEN, TRICKS["Sign"][0])]),  # a duplicate inside a request
        good.replace(b'"op":"random"', b'"op":"random","op":"random"'),
        good.replace(b'"op":"random"', b'"request":{},"op":"random"'),
        good[:-2] + b",]}",
        good + b" ",
        good.replace(b'{"items":', b'{"items":[],"items":'),
    ]
    for raw in off:
        assert _fast_batch(raw) is None, raw
    rng = random.Random(16)
    for m in _mutations(good, rng, 3000):
        got = _fast_batch(m)
        assert got is None or got == _batch_generic(m), m


def test_items_repeating_the_previous_head_agree_with_the_generic_path() -> None:
    """Items whose bytes repeat the last fully decoded item's up to its last value (the data:
    batch() then matches only the tail), with the tail changed every way an attacker might:
    another value, an optional field after it, a second data field, bad base64, trailing
    bytes. Each item gets its own dict."""
    head = b'{"token":"' + TOKEN.encode() + b'","key":"' + KEY.encode()
    head += b'","mechanism":"CKM_SHA256_HMAC","data":"'
    tails = [b'AAECAwQFBgc="}', b'QQ=="}', b'"}', b'QUJD"}', b'QQ==","mac_length":16}']
    tails += [b'QR=="}', b'QQ==","data":"QQ=="}', b'QQ=="} ', b'QQ==\\u0041"}', b'QQ"}']
    good = [("sign", None, head + t) for t in tails[:4]]
    raw = _batch_body([*good, ("sign", TOKEN, VALID["Sign"][0]), *good])
    got = _fast_batch(raw)
    assert got is not None and got == _batch_generic(raw)
    assert len({id(body) for _, _, body in got}) == len(got)
    for tail in tails[4:]:
        odd = _batch_body([*good, ("sign", None, head + tail), *good])
        generic = _batch_generic(odd)
        fast = _fast_batch(odd)
        assert fast is None or fast == generic, tail
        assert (fast is not None) == (tail == tails[4]), tail
    rng = random.Random(17)
    for m in _mutations(raw, rng, 3000):
        fast = _fast_batch(m)
        assert fast is None or fast == _batch_generic(m), m


# Tokens the fast path must take only when they are plain printable ASCII without a backslash.
_ODD_TOKENS = [
    b"v1.a b",
    b"",
    b"a\x7fb",
    b"a\x01b",
    b"a\\u0041",
    b"a\\\\b",
    b"\xc3\xa9t\xc3\xa9",
    b"x" * 600,
]


@pytest.mark.parametrize("token", _ODD_TOKENS)
def test_body_tokens_take_the_fast_path_only_as_plain_strings(token: bytes) -> None:
    """The same for a request's own token field (matched up to the next quote, then checked),
    with and without the optional fields around it, as the generic path decodes it."""
    sign = VALID["Sign"][0]
    for head in (b'{"token":"', b'{"request_id":"r-1","token":"'):
        for tail in (b"", b',"mac_length":16'):
            raw = head + token + b'",' + sign[1:-1] + tail + b"}"
            got = fastjson.decoder("Sign")(raw)  # type: ignore[misc]
            plain = all(0x20 <= c < 0x7F and c != 0x5C for c in token) and len(token) <= 4096
            assert (got is not None) == plain, raw
            if got is not None:
                assert got == decode_generic("Sign", raw)
                assert got["token"] == token.decode("ascii")


@pytest.mark.parametrize("token", _ODD_TOKENS)
def test_batch_tokens_take_the_fast_path_only_as_plain_strings(token: bytes) -> None:
    """A token is matched up to the next quote and then checked: the fast path takes it only
    when it is printable ASCII without an escape (what the generic path reads the same)."""
    sign = VALID["Sign"][0]
    item = b'{"op":"sign","token":"' + token + b'","request":' + sign + b"}"
    raw = b'{"items":[' + item + b"," + item + b"]}"
    got = _fast_batch(raw)
    plain = all(0x20 <= c < 0x7F and c != 0x5C for c in token)
    assert (got is not None) == plain, token
    if got is not None:
        assert got == _batch_generic(raw)
        assert got[0][1] == token.decode("ascii")


def test_a_batch_repeating_the_last_batchs_first_head_agrees_with_the_generic_path() -> None:
    """A batch whose first item repeats the previous batch's first item up to its last value
    joins that decoded head (fastjson._FIRST): the same answers as the generic path whatever
    follows, and no batch sees what a consumer did to another batch's requests."""
    head = b'{"token":"' + TOKEN.encode() + b'","key":"' + KEY.encode()
    head += b'","mechanism":"CKM_SHA256_HMAC","data":"'
    tails = [b'AAECAwQFBgc="}', b'QQ=="}', b'"}', b'QQ==","mac_length":16}', b'QR=="}', b'QQ"}']
    first = _batch_body([("sign", None, head + tails[0]), ("sign", None, head + tails[1])])
    got = _fast_batch(first)
    assert got is not None and got == _batch_generic(first)
    for _ in range(2):  # a consumer's change to a run's request (first decoded, then joined)
        found = fastjson.batch(first)
        assert found is not None
        found[1][0][2]["key"] = "changed"
    for tail in tails:
        for rest in ([], [("sign", None, head + tails[1])], [("random", None, b'{"length":4}')]):
            raw = _batch_body([("sign", None, head + tail), *rest])
            assert _fast_batch(raw) == _batch_generic(raw), (tail, rest)
            assert _fast_batch(first) == _batch_generic(first)
    rng = random.Random(18)
    for m in _mutations(first, rng, 2000):
        fast = _fast_batch(m)
        assert fast is None or fast == _batch_generic(m), m
        assert _fast_batch(first) == _batch_generic(first)


def test_a_batchs_request_id_in_its_body_agrees_with_the_generic_path() -> None:
    sign = VALID["Sign"][0]
    items = _batch_body([("sign", TOKEN, sign), ("sign", TOKEN, sign)])[len(b'{"items":') :]
    for rid in (b"r-1", b"a" * 64, b"A.b:c_d-9", b"", b"a" * 65, b"a b", b"\\u0041", b"\xc3\xa9"):
        raw = b'{"request_id":"' + rid + b'","items":' + items
        fast = fastjson.batch(raw)
        try:
            generic = decode_generic("Batch", raw)
        except ProtocolError:
            generic = None
        valid = protocol.REQUEST_ID_RE.fullmatch(rid.decode("latin-1")) is not None
        assert (fast is not None) is valid, rid  # the generic path words every refusal
        if fast is None:
            continue
        assert generic is not None and fast[0] == generic["request_id"] == rid.decode(), rid
        assert fastjson.items(fast[1]) == _batch_generic(b'{"items":' + items)
    # Anywhere else, or twice, it is the generic path's to word.
    for raw in (
        b'{"items":' + items[:-1] + b',"request_id":"r-1"}',
        b'{"request_id":"r-1","request_id":"r-2","items":' + items,
        b'{"request_id":1,"items":' + items,
    ):
        assert fastjson.batch(raw) is None, raw


def test_verify_runs_of_data_and_mac_agree_with_the_generic_path() -> None:
    """Verify items whose bytes repeat the run's first up to the data (each its own data and
    MAC) form one run of (data, signature) values; every way the tail can differ (another
    field between them, their order, bad base64 in either, an optional field after) is what
    the generic path makes of it, or off the fast path."""
    head = b'{"token":"' + TOKEN.encode() + b'","key":"' + KEY.encode()
    head += b'","mechanism":"CKM_SHA256_HMAC","data":"'
    tails = [b'QQ==","signature":"QUI="}', b'","signature":""}', b'QUJD","signature":"QQ=="}']
    odd = [
        b'QQ==","signature":"QUI=","mac_length":16}',
        b'QQ==","signature":"QR=="}',
        b'QR==","signature":"QUI="}',
        b'QQ==","data":"QQ==","signature":"QUI="}',
        b'QQ==","signature":"QUI=","signature":"QUI="}',
        b'QQ==", "signature":"QUI="}',
        b'QQ=="}',
    ]
    good: list[tuple[str, str | None, bytes]] = [("verify", None, head + t) for t in tails]
    raw = _batch_body(good * 2)
    found = fastjson.batch(raw)
    assert found is not None and [len(r[4] or ()) for r in found[1]] == [6]
    assert found[1][0][3] == ("data", "signature")
    assert _fast_batch(raw) == _batch_generic(raw) is not None
    for tail in odd:
        raw = _batch_body([*good, ("verify", None, head + tail), *good])
        fast = _fast_batch(raw)
        assert fast is None or fast == _batch_generic(raw), tail
    rng = random.Random(19)
    for m in _mutations(raw, rng, 3000):
        fast = _fast_batch(m)
        assert fast is None or fast == _batch_generic(m), m
    # A single verify in the module's spelling (request id first) repeats its head the same way.
    single = fastjson.decoder("Verify")
    assert single is not None
    for tail in [*tails, *odd]:
        body = b'{"request_id":"r-1",' + head[1:] + tail
        got = single(body)
        assert got is None or got == _generic("Verify", body), tail
        assert single(body) == got  # (the second time through the kept rest)


@pytest.mark.parametrize("struct", ["Sign", "Verify"])
def test_repeated_request_id_bodies_agree_with_the_generic_path(struct: str) -> None:
    """A body in the module's spelling (request id first) repeating the last one decoded in full
    up to its trailing values (fastjson.RidFirst), mutated: what the generic path makes of it,
    whichever body primed the decoder, and every accepted one has its own dict."""
    fast = fastjson.decoder(struct)
    assert isinstance(fast, fastjson.RidFirst)
    raw = b'{"request_id":"r-1","token":"' + TOKEN.encode() + b'",' + VALID[struct][0][1:]
    rng = random.Random(20)
    taken = 0
    for m in _mutations(raw, rng, 2000):
        assert fast(raw) == _generic(struct, raw)  # primes: the next one repeats it
        got = fast(m)
        assert got is None or got == _generic(struct, m), m
        if got is not None:
            taken += 1
            got["key"] = "changed"  # a consumer's change reaches no other body
    assert taken > 50
    assert fast(raw) == _generic(struct, raw)


def test_one_run_agrees_with_the_generic_path() -> None:
    """A batch that repeats the last batch's first head in every item (fastjson.one_run, the
    batch's direct path) is exactly the generic path's one run of those items, mutated any way."""
    head = b'{"token":"' + TOKEN.encode() + b'","key":"' + KEY.encode()
    head += b'","mechanism":"CKM_SHA256_HMAC","data":"'
    good = _batch_body([("sign", None, head + t) for t in (b'QQ=="}', b'QUI="}', b'"}')])
    raw = b'{"request_id":"r-1",' + good[1:]
    rng = random.Random(21)
    taken = 0
    for m in [raw, good, *_mutations(raw, rng, 3000)]:
        assert fastjson.batch(good) is not None  # primes _FIRST
        found = fastjson.one_run(m)
        if found is None:
            continue
        taken += 1
        rid, (op, token, request, names, values) = found
        assert names is not None and values is not None and token is None
        generic = decode_generic("Batch", m)
        assert generic.get("request_id") == rid
        want = _batch_generic(b'{"items":' + json.dumps(generic["items"]).encode() + b"}")
        assert want is not None and len(want) == len(values)
        for (wop, wtoken, wbody), value in zip(want, values, strict=True):
            body = dict(request)
            fastjson.put(body, names, value)
            assert (wop, wtoken, wbody) == (op, None, body)
    assert taken > 10  # (the two unchanged bodies, and mutations that stay valid)
