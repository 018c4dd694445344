"""pkcs11ws.client.wire's JSON (dumps, loads): exactly what json gives (text, values, errors),
through json's C code, without importing the json package for a compact document."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from pkcs11ws.client import wire

REPO = Path(__file__).resolve().parents[2]

VALUES: list[Any] = [
    {"a": [1, 2.5, "x\u00e9\u2603\U0001f600", None, True, False], "b": {}},
    {"data": "AAEC/w==", "mechanism": "CKM_SHA256_HMAC", "mac_length": 32},
    [],
    "plain",
    'quote " backslash \\ control \x01\n\t',
    0,
    -7,
    10**30,
    1e300,
    -0.0,
    float("inf"),
    float("-inf"),
    {"nested": [[[{"k": [None]}]]]},
    {1: "int key", False: "bool key", None: "none key", 2.5: "float key"},
]


@pytest.mark.parametrize("value", VALUES)
def test_dumps_is_json_compact_ascii(value: Any) -> None:
    assert wire.dumps(value) == json.dumps(value, separators=(",", ":"))


@pytest.mark.parametrize("value", [v for v in VALUES if not isinstance(v, dict) or None not in v])
def test_loads_reads_back_what_json_reads(value: Any) -> None:
    for text in (json.dumps(value, separators=(",", ":")), json.dumps(value, indent=2)):
        assert wire.loads(text.encode()) == json.loads(text)


def test_encode_str_is_json_string_encoder() -> None:
    s = 'tok\u00e9n"\\\x00'
    assert getattr(wire, "_json_str")(s) == json.dumps(s)  # noqa: B009  # not re-exported


def test_dumps_refuses_what_json_refuses() -> None:
    with pytest.raises(TypeError, match="Object of type bytes is not JSON serializable"):
        wire.dumps({"a": b"raw"})
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference detected"):
        wire.dumps(loop)
    assert wire.dumps([1]) == "[1]"  # a failed call leaves nothing behind


def test_constants_and_nan() -> None:
    got = wire.loads(b"[NaN,Infinity,-Infinity]")
    assert math.isnan(got[0]) and got[1:] == [math.inf, -math.inf]


@pytest.mark.parametrize(
    "text",
    ["", " ", "{", '{"a":', "[1,]", '{"a" 1}', '"\x01"', "[1] x", "tru", '{"a":1}}', "\ufeff{}"],
)
def test_errors_are_jsons_errors(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        wire.loads(text.encode())
    assert str(got.value) == str(want.value)


def test_whitespace_around_and_trailing_data_take_the_full_decoder() -> None:
    assert wire.loads(b' {"a": 1} \n') == {"a": 1}
    with pytest.raises(ValueError, match="Extra data"):
        wire.loads(b'{"a":1} {}')


def test_a_compact_document_does_not_import_json() -> None:
    # The fast path is json's C scanner and encoder alone; an error (worded by json's own
    # exception class) brings the json package in.
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "from pkcs11ws.client import wire\n"
        'v = wire.loads(b\'{"slots":[{"id":"c1","label":"x"}],"n":1}\')\n'
        "t = wire.dumps(v)\n"
        "before = [m for m in ('json', 're', 'enum') if m in sys.modules]\n"
        "try:\n"
        "    wire.loads(b'{')\n"
        "except ValueError as e:\n"
        "    kind = type(e).__name__\n"
        "print(t, before, kind)\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == '{"slots":[{"id":"c1","label":"x"}],"n":1} [] JSONDecodeError'
