"""Strict request decoding without the generic walk, for bodies in the clients' own spelling.

A request body that is compact JSON with the structure's fields in their protocol order and
only plain values (strings of printable ASCII without escapes, canonical base64, unsigned
integers without leading zeros, true/false) is decoded here by one regular expression per
structure, generated from protocol.STRUCTS (the one schema: nothing is declared twice). Every
other spelling (whitespace, escapes, another field order, non-ASCII, nested values, anything
malformed) gets None, and the caller decodes it with the generic strict path (json with the
duplicate-key check, then protocol.decode), which also words every error. So this path accepts
a subset of what the generic path accepts and gives the same result for it: each field once,
in a fixed order, so no duplicate and no unknown field can pass; a string without escapes is
its own value; base64 goes through the same canonical check; lengths and ranges are checked
alike, and a value over a limit is left to the generic path to refuse.

Batches (`{"items":[...]}`) are matched item by item: op, optional token, and the request in
its endpoint's structure, and given as runs of items that differ only in their trailing values
(BatchRun: a sign's data; a verify's data and signature). A batch with any item off this path
is decoded generically as a whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

from pkcs11ws import protocol
from pkcs11ws.protocol import STRUCTS, Field, Struct
from pkcs11ws.server._hot import b64_canonical, scan_batch, scan_run, scan_single

_MAX_ULONG: Final = 0xFFFFFFFFFFFFFFFF
# Printable ASCII but the quote and the backslash: a JSON string made of these is its value.
_PLAIN: Final = rb'"([ !#-\[\]-~]*)"'
_VALUE: Final[dict[str, bytes]] = {
    "str": _PLAIN,
    # Up to the next quote (a byte compare, where a character class costs ~24 instructions a
    # byte): b64_canonical refuses every byte outside the alphabet and bad padding.
    "bytes": rb'"([^"]*)"',
    "int": rb"(0|[1-9][0-9]{0,19})",
    "bool": rb"(true|false)",
}
# A long string (over _LONG characters allowed: the activation token) is matched up to the next
# quote (memchr-fast, where a character class is tested byte by byte), then checked in _values
# as _PLAIN would have (kind "text").
_LONG: Final = 256
_TEXT: Final = rb'"([^"]*)"'
# A field's separator: right after the opening brace, or a comma that does not follow it.
_SEP: Final = rb"(?:(?<=\{)|(?<!\{),)"

Decoded = dict[str, Any]
# (field name, its kind's _CONVERT, max_len) per group of a structure's expression, in order.
_Fields = tuple[tuple[str, Callable[[bytes], Any], int], ...]


def _kind(f: Field) -> str:
    return "text" if f.kind == "str" and f.max_len > _LONG else f.kind


def _expression(struct: Struct) -> tuple[re.Pattern[bytes], _Fields] | None:
    parts = [rb"\{"]
    fields: list[tuple[str, Callable[[bytes], Any], int]] = []
    after_required = False  # a required field comes earlier: this one follows a comma
    for i, f in enumerate(struct.fields):
        kind = _kind(f)
        value = _TEXT if kind == "text" else _VALUE.get(kind)
        if value is None:
            return None  # attrs, lists, objects: the generic path
        # The separator is known from the structure where it can be (the first field has
        # none; after a required field, a comma): the look-behind pair only for a field that
        # only optional fields precede (several times cheaper to match).
        sep = b"" if i == 0 else b"," if after_required else _SEP
        piece = sep + b'"' + re.escape(f.name.encode("ascii")) + b'":' + value
        parts.append(piece if f.required else b"(?:" + piece + b")?")
        fields.append((f.name, _CONVERT[kind], f.max_len))
        after_required = after_required or f.required
    parts.append(rb"\}")
    return re.compile(b"".join(parts)), tuple(fields)


# Long strings already found plain, by their bytes: a client sends the same token with each
# request, and checking its ~200 characters costs several times the lookup. Bounded.
_TEXTS: dict[bytes, str] = {}
_TEXTS_MAX: Final = 4096


def _text(raw: bytes) -> str | None:
    """raw as a str when it is what _PLAIN admits (printable ASCII without a backslash, which
    would start an escape: the generic path), else None."""
    text = _TEXTS.get(raw)
    if text is None:
        if not raw.isascii() or b"\\" in raw:
            return None
        text = raw.decode("ascii")
        if not text.isprintable():
            return None
        if len(_TEXTS) >= _TEXTS_MAX:
            _TEXTS.clear()
        _TEXTS[raw] = text
    return text


def _uint(raw: bytes) -> int | None:
    value = int(raw)
    return value if value <= _MAX_ULONG else None


def _bool(raw: bytes) -> bool:
    return raw == b"true"


# Each kind's value from its matched bytes, or None (off this path). A "str" is ASCII by its
# expression, so bytes.decode (UTF-8) gives what an ASCII decode would, in one C call.
_CONVERT: Final[dict[str, Callable[[bytes], Any]]] = {
    "str": bytes.decode,
    # protocol.canonical_b64 on the still undecoded ASCII, compiled (server/_hot.pyx): the
    # same checks, without a Python frame and a2b_base64's strict mode (~3.5k instructions
    # for a 64-byte value).
    "bytes": b64_canonical,
    "text": _text,
    "int": _uint,
    "bool": _bool,
}


def _values(groups: tuple[bytes | None, ...], fields: _Fields) -> Decoded | None:
    out: Decoded = {}
    # (zip without strict: the expression has a group per field; a keyword argument makes the
    # call ~1.5k instructions dearer)
    for raw, (name, convert, max_len) in zip(groups, fields):  # noqa: B905
        if raw is None:
            continue  # an optional field not sent
        value = convert(raw)
        if value is None or (max_len and len(value) > max_len):
            return None
        out[name] = value
    return out


def _trailing(fields: tuple[Field, ...]) -> int:
    """How many values end a spelling of these fields and make a run's items differ (BatchRun):
    its last one, and the required base64 fields right before it when it is one too (a
    verify's data and signature: each caller's own)."""
    k = 1
    if _kind(fields[-1]) == "bytes":
        while k < len(fields) and fields[-k - 1].required and _kind(fields[-k - 1]) == "bytes":
            k += 1
    return k


class _Structure:
    """A structure's expression (match, fields) and, when optional fields follow its last
    required one, the expression of its common spelling without those (short,
    short_fields), tried first: fewer groups to walk and no optional group to try at the end
    (a 16-item batch of signatures: 551k -> 513k instructions). last: the short spelling's
    trailing values (_trailing), names their names; tail: those values and the closing brace,
    for a batch item that repeats the previous item's bytes up to the first of them
    (batch()); mids: the bytes between two of them, from one's closing quote to the next
    one's opening quote."""

    __slots__ = (
        "back",
        "fields",
        "last",
        "match",
        "mids",
        "names",
        "scan",
        "short",
        "short_fields",
        "tail",
    )

    def __init__(self, struct: Struct) -> None:
        made = _expression(struct)
        assert made is not None
        self.match = made[0].match
        self.fields = made[1]
        last = max((i for i, f in enumerate(struct.fields) if f.required), default=-1)
        head = Struct(struct.name, struct.fields[: last + 1], struct.doc)
        short = _expression(head) if head.fields and head.fields != struct.fields else None
        self.short = short[0].match if short is not None else None
        self.short_fields = short[1] if short is not None else ()
        # The short spelling's trailing fields: the first one's value's expression without the
        # opening quote (where its group starts), the others' pieces as _expression spells
        # them after a required field, then the closing brace.
        spelled = (head if short is not None else struct).fields
        k = _trailing(spelled)
        self.last = (self.short_fields or self.fields)[-k:]
        self.names = tuple(name for name, _, _ in self.last)
        self.back = len(self.last) - 1  # the first trailing value's group: the last's - back
        values = [_TEXT if _kind(f) == "text" else _VALUE[_kind(f)] for f in spelled[-k:]]
        pieces = [values[0].removeprefix(b'"')]
        pieces += [
            b',"' + re.escape(n.encode("ascii")) + b'":' + v
            for n, v in zip(self.names[1:], values[1:], strict=True)
        ]
        self.tail = re.compile(b"".join(pieces) + rb"\}").match
        self.mids = tuple(b'","' + n.encode("ascii") + b'":"' for n in self.names[1:])
        # The values are matched up to the next quote (_TEXT): batch() then scans a run's
        # items in C (_hot.scan_run, the same matching as tail and the loop's checks).
        self.scan = all(v == _TEXT for v in values)

    def decode(self, raw: bytes, pos: int) -> tuple[Decoded | None, int, int]:
        """The structure's object at raw[pos:], where it ends, and where the group of its first
        trailing value (last) starts when those end the object (short spelling, or no optional
        field), else -1; (None, -1, -1) when it is off this path."""
        if self.short is not None:
            m = self.short(raw, pos)
            if m is not None:  # the full expression's groups and end, but for the Nones
                groups = m.groups()
                return _values(groups, self.short_fields), m.end(), m.start(len(groups) - self.back)
        m = self.match(raw, pos)
        if m is None:
            return None, -1, -1
        groups = m.groups()
        at = -1 if self.short else m.start(len(groups) - self.back)
        return _values(groups, self.fields), m.end(), at

    def run_value(self, body: Decoded) -> Any:
        """A decoded body's trailing values as a run holds them (BatchRun)."""
        if len(self.names) == 1:
            return body[self.names[0]]
        return tuple(body[n] for n in self.names)

    def tail_value(self, t: re.Match[bytes]) -> Any:
        """The trailing values tail matched, as a run holds them; None: off this path."""
        out = []
        for i, (_, convert, max_len) in enumerate(self.last):
            value = convert(t.group(i + 1))
            if value is None or (max_len and len(value) > max_len):
                return None
            out.append(value)
        return out[0] if len(out) == 1 else tuple(out)


def put(body: Decoded, names: tuple[str, ...], value: Any) -> None:
    """An item's trailing values (as a run holds them: BatchRun) into its request."""
    if len(names) == 1:
        body[names[0]] = value
    else:
        body.update(zip(names, value, strict=True))


def _structures() -> dict[str, _Structure]:
    out: dict[str, _Structure] = {}
    for name, struct in STRUCTS.items():
        if _expression(struct) is not None and struct.fields:
            out[name] = _Structure(struct)
    return out


_STRUCTURES: Final = _structures()


# A single crypto request in the module's spelling starts with its request id, which changes
# with every request; the rest up to its trailing values (token, key, mechanism) is mostly
# the previous request's.
_RID_HEAD: Final = b'{"' + protocol.REQUEST_ID_FIELD.encode("ascii") + b'":"'


def _rid_bytes() -> bytes:
    """The bytes protocol.REQUEST_ID_RE allows in a request id (a 256-entry table for
    _hot.scan_single), checked to be all it asks: 1 to the field's max_len of them."""
    rid = protocol.REQUEST_ID_RE.fullmatch
    table = bytes(rid(chr(c)) is not None for c in range(256))
    most = STRUCTS["Sign"].by_name[protocol.REQUEST_ID_FIELD].max_len
    ok = bytes(c for c in range(256) if table[c]).decode("ascii")
    if rid(ok[:most]) is None or rid(ok[0] * (most + 1)) or rid(""):
        raise RuntimeError("REQUEST_ID_RE is more than a class of bytes and a length")
    return table


_RID_BYTES: Final = _rid_bytes()


class RidFirst:
    """The fast decoder of a structure whose first field is the request id, and whose trailing
    values (_Structure.last) are strings matched up to their quotes (crypto requests).

    A body that starts with the request id and whose bytes from the end of that value up to
    its trailing values are those of the last body decoded in full (rest) has that body's
    other fields (kept: without the request id and the trailing values): JSON without escapes
    splits only one way, and rest was matched in the same place (after a string's closing
    quote). Only the request id (one of protocol.REQUEST_ID_RE's) and the trailing values
    (their kinds' conversions) are decoded, in C (scan). The single request's direct path
    (server/single.py) uses rest and kept as they are, without a dict per request."""

    __slots__ = ("kept", "last", "mids", "names", "rest", "rid_max", "rid_name", "structure")

    def __init__(self, s: _Structure, first: Field) -> None:
        self.structure = s.decode
        self.last = s.last
        self.mids = s.mids
        self.names = s.names
        self.rid_max = first.max_len
        self.rid_name = first.name
        self.rest = b"\x00"  # (a rest starts with a quote: matches nothing until a body has)
        self.kept: Decoded = {}

    def scan(self, raw: bytes) -> tuple[str, Any] | None:
        """The request id and the trailing values (one value, or a tuple of several) of a body
        that repeats rest; else None."""
        return scan_single(
            raw, _RID_HEAD, self.rest, self.last, self.mids, _RID_BYTES, self.rid_max
        )

    def __call__(self, raw: bytes) -> Decoded | None:
        found = scan_single(
            raw, _RID_HEAD, self.rest, self.last, self.mids, _RID_BYTES, self.rid_max
        )
        if found is not None:
            again: Decoded = {self.rid_name: found[0], **self.kept}  # (in order)
            put(again, self.names, found[1])
            return again
        body, end, last_at = self.structure(raw, 0)
        if end != len(raw) or body is None:
            return None
        if last_at >= 0 and self.rid_name in body:
            q = raw.find(b'"', len(_RID_HEAD))
            kept = body.copy()
            del kept[self.rid_name]
            for n in self.names:
                del kept[n]
            self.rest, self.kept = raw[q:last_at], kept
        return body


_DECODERS: dict[str, Callable[[bytes], Decoded | None]] = {}


def decoder(struct: str) -> Callable[[bytes], Decoded | None] | None:
    """The fast decoder of a structure (None: it has fields this path does not take); the
    same one for every caller (a RidFirst's rest is shared by the app's decoding and the
    single request's direct path)."""
    made = _DECODERS.get(struct)
    if made is not None:
        return made
    s = _STRUCTURES.get(struct)
    if s is None:
        return None
    structure = s.decode
    first = STRUCTS[struct].fields[0]
    if first.name == protocol.REQUEST_ID_FIELD and first.kind == "str" and s.scan:
        made = RidFirst(s, first)
    else:

        def decode(raw: bytes) -> Decoded | None:
            body, end, _ = structure(raw, 0)
            if end != len(raw):
                return None
            return body

        made = decode
    _DECODERS[struct] = made
    return made


# One batch item up to its request: {"op":"...","token":"...","request":
# The token is any run of bytes up to the next quote here (memchr-fast, where a character class
# is tested byte by byte); batch() then asks of it what _PLAIN would have.
_ITEM: Final = re.compile(rb'\{"op":"([a-z_]{1,32})"(?:,"token":"([^"]*)")?,"request":')
_BATCH_HEAD: Final = b'{"items":['
# A batch's request id, when it is the body's first field (protocol: Batch), then its items;
# only a valid one (protocol.REQUEST_ID_RE's class and length): the generic path words the
# refusal of any other.
_BATCH_RID: Final = re.compile(
    rb'\{"' + protocol.REQUEST_ID_FIELD.encode("ascii") + rb'":"([A-Za-z0-9_.:-]{1,64})","items":\['
).match
# A batch's request id, when it is the body's first field, up to the items' opening bracket
# (from the id's closing quote): one_run's spelling of what _BATCH_RID matches.
_BATCH_RID_TAIL: Final = b'","items":['
_BATCH_RID_MAX: Final = STRUCTS["Batch"].by_name[protocol.REQUEST_ID_FIELD].max_len
# By the op's bytes: the op (the protocol's own str) and its request's structure.
_BATCH_REQUEST: Final[dict[bytes, tuple[str, _Structure]]] = {
    op.encode("ascii"): (op, _STRUCTURES[protocol.ENDPOINT_BY_OP[op].request])
    for op in protocol.BATCHABLE
    if protocol.ENDPOINT_BY_OP[op].request in _STRUCTURES
}

# (op, token, decoded request) per item.
BatchItems = list[tuple[str, str | None, Decoded]]
# A run of items (op, token, request, names, values): the items of a batch mostly differ only in
# their request's trailing values (_Structure.last: the data to sign; the data and MAC to
# verify). A run is items whose bytes up to those values are the first's (so the same op,
# token and other values, as JSON without escapes splits only one way); request is the first's
# decoded request, names the trailing fields, values their values per item of the run (the
# first's included): the value itself for one name, else a tuple (fastjson.put). names and
# values are None for an item that repeats none (an optional field follows its trailing
# values). request is shared by the run: whoever changes an item's request changes a copy.
BatchRun = tuple[str, str | None, Decoded, tuple[str, ...] | None, list[Any] | None]


def count(runs: list[BatchRun]) -> int:
    """The number of items in runs."""
    n = 0
    for r in runs:
        n += 1 if r[4] is None else len(r[4])
    return n


def items(runs: list[BatchRun]) -> BatchItems:
    """runs as one (op, token, request) per item, each with its own request dict."""
    out: BatchItems = []
    for op, token, request, names, values in runs:
        if values is None or names is None:
            out.append((op, token, request.copy()))
        else:
            for value in values:
                body = request.copy()
                put(body, names, value)
                out.append((op, token, body))
    return out


# The last batch's first run as batch() found it: (its head, op, token, structure, request).
# A client's batches mostly start with the same head (the same token, key and mechanism): a
# batch whose first item repeats it joins it, as an item joins a run (a head is matched in the
# same place, a batch's first item; JSON without escapes splits only one way).
_FIRST: list[tuple[bytes, str, str | None, _Structure, Decoded] | None] = [None]


def batch(raw: bytes) -> tuple[str | None, list[BatchRun]] | None:
    """A batch body's request id (None: not in the body; else valid) and its items in runs,
    each request decoded in its endpoint's structure; None when any part is off this path
    (the generic path then decodes the whole body)."""
    if not raw.endswith(b"]}"):
        return None
    if raw.startswith(_BATCH_HEAD):
        rid = None
        pos = len(_BATCH_HEAD)
    else:
        m = _BATCH_RID(raw)
        if m is None:
            return None
        rid = m.group(1).decode("ascii")
        pos = m.end()
    runs = _runs(raw, pos)
    return None if runs is None else (rid, runs)


def one_run(raw: bytes) -> tuple[str | None, BatchRun] | None:
    """A batch body whose items are all one run that repeats the last batch's first head
    (_FIRST): its request id (None: not in the body; else valid) and that run (its values
    never None), read in C (_hot.scan_batch); None for any other body (batch() then decodes
    it). The run's request is _FIRST's own dict: read it, never change it."""
    first = _FIRST[0]
    if first is None:
        return None
    head, op, token, s, request = first
    values: list[Any] = []
    found = scan_batch(
        raw,
        _BATCH_HEAD,
        _RID_HEAD,
        _BATCH_RID_TAIL,
        _RID_BYTES,
        _BATCH_RID_MAX,
        head,
        s.last,
        s.mids,
        values,
    )
    if found is None:
        return None
    return found[0], (op, token, request, s.names, values)


def _runs(raw: bytes, pos: int) -> list[BatchRun] | None:
    """The items from pos (after the items' opening bracket) in runs (batch())."""
    runs: list[BatchRun] = []
    start_at = pos  # where the first item starts (_FIRST)
    end = len(raw) - 2
    if pos == end:
        return runs
    item = _ITEM.match
    last_raw: bytes | None = None
    last_token: str | None = None
    # An item whose bytes up to its trailing values are those of the run's first item (head)
    # joins that run: only its tail (those values and the closing brace) is matched and
    # decoded. s: the run's structure.
    head = b""
    tail: Callable[[bytes, int], re.Match[bytes] | None] | None = None
    scan = False
    values: list[Any] = []
    s: Any = None
    convert: Callable[[bytes], Any] = bytes.decode
    max_len = 0
    first = _FIRST[0]
    if first is not None and raw.startswith(first[0], pos):
        head, op, token, s, request = first
        at = scan_run(raw, pos, head, end, s.last, s.mids, values)
        if values:  # (else its values did not end it: decoded in full below)
            runs.append((op, token, request.copy(), s.names, values))
            if at < 0:
                return runs if at == -2 else None
            pos, tail, scan = at, s.tail, True
        elif at == -1:
            return None
    while True:
        if scan:
            pos = scan_run(raw, pos, head, end, s.last, s.mids, values)
            if pos < 0:
                return runs if pos == -2 else None
        elif tail is not None and raw.startswith(head, pos):
            t = tail(raw, pos + len(head))
            if t is not None:
                if not s.back:
                    # _values for the one field, inline: a call and a dict merge cost ~4.5k
                    # instructions an item
                    value = convert(t.group(1))
                    if value is not None and max_len and len(value) > max_len:
                        value = None
                else:
                    value = s.tail_value(t)
                if value is None:
                    return None
                values.append(value)
                pos = t.end()
                if raw[pos : pos + 1] != b"}":
                    return None
                pos += 1
                if pos == end:
                    return runs
                if raw[pos : pos + 1] != b",":
                    return None
                pos += 1
                continue
        m = item(raw, pos)
        if m is None:
            return None
        found = _BATCH_REQUEST.get(m.group(1))
        if found is None:
            return None  # not batchable, or its request takes the generic path
        op, s = found
        start = pos
        body, pos, last_at = s.decode(raw, m.end())
        if body is None:
            return None
        token_raw = m.group(2)
        if token_raw is None:
            token = None
        elif token_raw == last_raw:
            token = last_token  # the items of a batch mostly share one token: one str for all
        else:
            token = _text(token_raw)
            if token is None:
                return None
            last_raw, last_token = token_raw, token
        if last_at >= 0:
            head = raw[start:last_at]
            tail = s.tail
            scan = s.scan
            if start == start_at and scan:
                _FIRST[0] = (head, op, token, s, body.copy())
            name, convert, max_len = s.last[0]
            values = [body[name] if not s.back else s.run_value(body)]
            runs.append((op, token, body, s.names, values))
        else:
            tail = None
            scan = False
            runs.append((op, token, body, None, None))
        if raw[pos : pos + 1] != b"}":
            return None
        pos += 1
        if pos == end:
            return runs
        if raw[pos : pos + 1] != b",":
            return None
        pos += 1
