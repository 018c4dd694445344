"""RSA and EC key pairs: generation (C_GenerateKeyPair) and import of a private key
(C_CreateObject of a CKO_PRIVATE_KEY with its components, as pkcs11-tool --write-object and
Java's KeyStore.setKeyEntry send it).

The private key's value is its PKCS#8 DER, sealed under the card key like a secret key's; the
public half is a public object (CKA_PRIVATE false unless the template asks otherwise) whose
attributes carry everything public: CKA_MODULUS/CKA_PUBLIC_EXPONENT or CKA_EC_PARAMS/CKA_EC_POINT
and CKA_PUBLIC_KEY_INFO (DER SubjectPublicKeyInfo). The private key repeats those public
attributes, as pkcs11-provider and Java read them from it.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pkcs11ws import attributes as A
from pkcs11ws import constants as C
from pkcs11ws import mechanisms
from pkcs11ws.protocol import Attrs
from pkcs11ws.protocol import ProtocolError as ApiError

E_65537: Final = b"\x01\x00\x01"
# CKA_EC_PARAMS: the DER of the curve's OID, or a PrintableString with its name.
CURVES: Final[dict[bytes, ec.EllipticCurve]] = {
    bytes.fromhex("06082a8648ce3d030107"): ec.SECP256R1(),
    bytes.fromhex("06052b81040022"): ec.SECP384R1(),
    bytes.fromhex("06052b81040023"): ec.SECP521R1(),
}
_CURVE_NAMES: Final = {
    b"prime256v1": 0,
    b"secp256r1": 0,
    b"P-256": 0,
    b"secp384r1": 1,
    b"P-384": 1,
    b"secp521r1": 2,
    b"P-521": 2,
}
_OIDS: Final = list(CURVES)
# What a generation template may say about the key it asks for (inputs, not stored as given).
GEN_INPUTS: Final = ("CKA_MODULUS_BITS", "CKA_PUBLIC_EXPONENT", "CKA_EC_PARAMS")
_DER: Final = serialization.Encoding.DER

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _inconsistent(msg: str) -> ApiError:
    return ApiError("TEMPLATE_INCONSISTENT", msg)


def curve_oid(params: bytes) -> bytes:
    """The curve's OID DER from CKA_EC_PARAMS (OID or named curve)."""
    if params in CURVES:
        return params
    if len(params) > 2 and params[0] == 0x13 and params[1] == len(params) - 2:
        idx = _CURVE_NAMES.get(params[2:])
        if idx is not None:
            return _OIDS[idx]
    raise ApiError("ATTRIBUTE_VALUE_INVALID", "CKA_EC_PARAMS: P-256, P-384 or P-521 only")


def _exponent_ok(e: object) -> None:
    if e is not None and (not isinstance(e, bytes) or e.lstrip(b"\x00") != E_65537):
        raise ApiError("ATTRIBUTE_VALUE_INVALID", "CKA_PUBLIC_EXPONENT must be 65537")


def public_attrs(key: PrivateKey) -> Attrs:
    """The public attributes both halves carry."""
    pub = key.public_key()
    spki = pub.public_bytes(_DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers().public_numbers
        return {
            "CKA_KEY_TYPE": C.CKK_RSA,
            "CKA_MODULUS": n.n.to_bytes((key.key_size + 7) // 8, "big"),
            "CKA_MODULUS_BITS": key.key_size,
            "CKA_PUBLIC_EXPONENT": n.e.to_bytes((n.e.bit_length() + 7) // 8, "big"),
            "CKA_PUBLIC_KEY_INFO": spki,
        }
    point = pub.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    oid = next(o for o, c in CURVES.items() if c.name == key.curve.name)
    return {
        "CKA_KEY_TYPE": C.CKK_EC,
        "CKA_EC_PARAMS": oid,
        "CKA_EC_POINT": _octet_string(point),
        "CKA_PUBLIC_KEY_INFO": spki,
    }


def _octet_string(data: bytes) -> bytes:
    n = len(data)
    if n < 0x80:
        return bytes((0x04, n)) + data
    return (
        bytes((0x04, 0x81, n)) + data
        if n < 0x100
        else bytes((0x04, 0x82)) + n.to_bytes(2, "big") + data
    )


def pkcs8(key: PrivateKey) -> bytes:
    return key.private_bytes(_DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def generate(mech: mechanisms.Mechanism, pub_t: Attrs, priv_t: Attrs) -> PrivateKey:
    """A new private key from the generation inputs of either template."""
    given = {n: t[n] for t in (pub_t, priv_t) for n in GEN_INPUTS if n in t}
    for t in (pub_t, priv_t):
        for n in GEN_INPUTS:
            if n in t and t[n] != given[n]:
                raise _inconsistent(f"{n} differs between the two templates")
    if mech.gen_key_type == C.CKK_RSA:
        bits = given.get("CKA_MODULUS_BITS")
        if bits is None:
            raise ApiError("TEMPLATE_INCOMPLETE", "CKA_MODULUS_BITS is required for RSA")
        if bits not in mechanisms.RSA_BITS:
            raise ApiError("KEY_SIZE_RANGE", f"RSA keys are {mechanisms.RSA_BITS} bits")
        _exponent_ok(given.get("CKA_PUBLIC_EXPONENT"))
        if "CKA_EC_PARAMS" in given:
            raise _inconsistent("CKA_EC_PARAMS is not an RSA attribute")
        assert isinstance(bits, int)
        return rsa.generate_private_key(65537, bits)
    params = given.get("CKA_EC_PARAMS")
    if params is None:
        raise ApiError("TEMPLATE_INCOMPLETE", "CKA_EC_PARAMS is required for EC")
    if "CKA_MODULUS_BITS" in given or "CKA_PUBLIC_EXPONENT" in given:
        raise _inconsistent("CKA_MODULUS_BITS/CKA_PUBLIC_EXPONENT are not EC attributes")
    assert isinstance(params, bytes)
    return ec.generate_private_key(CURVES[curve_oid(params)])


def _int(t: Attrs, name: str) -> int:
    v = t.get(name)
    if not isinstance(v, bytes) or not v:
        raise ApiError("TEMPLATE_INCOMPLETE", f"{name} is required to import an RSA key")
    return int.from_bytes(v, "big")


def imported(t: Attrs) -> PrivateKey:
    """The private key a C_CreateObject template carries."""
    kt = t.get("CKA_KEY_TYPE")
    try:
        if kt == C.CKK_RSA:
            e = _int(t, "CKA_PUBLIC_EXPONENT")
            pub = rsa.RSAPublicNumbers(e, _int(t, "CKA_MODULUS"))
            p, q, d = (
                _int(t, "CKA_PRIME_1"),
                _int(t, "CKA_PRIME_2"),
                _int(t, "CKA_PRIVATE_EXPONENT"),
            )
            numbers = rsa.RSAPrivateNumbers(
                p,
                q,
                d,
                _int(t, "CKA_EXPONENT_1") if "CKA_EXPONENT_1" in t else d % (p - 1),
                _int(t, "CKA_EXPONENT_2") if "CKA_EXPONENT_2" in t else d % (q - 1),
                _int(t, "CKA_COEFFICIENT") if "CKA_COEFFICIENT" in t else pow(q, -1, p),
                pub,
            )
            key: PrivateKey = numbers.private_key()
            if key.key_size not in mechanisms.RSA_BITS:
                raise ApiError("KEY_SIZE_RANGE", f"RSA keys are {mechanisms.RSA_BITS} bits")
            return key
        if kt == C.CKK_EC:
            params, value = t.get("CKA_EC_PARAMS"), t.get("CKA_VALUE")
            if not isinstance(params, bytes) or not isinstance(value, bytes):
                raise ApiError("TEMPLATE_INCOMPLETE", "CKA_EC_PARAMS and CKA_VALUE are required")
            curve = CURVES[curve_oid(params)]
            return ec.derive_private_key(int.from_bytes(value, "big"), curve)
    except ValueError:
        raise ApiError("ATTRIBUTE_VALUE_INVALID", "the key's components do not fit") from None
    if kt is None:
        raise ApiError("TEMPLATE_INCOMPLETE", "CKA_KEY_TYPE is required")
    raise ApiError("ATTRIBUTE_VALUE_INVALID", "private keys are CKK_RSA or CKK_EC")


def check_public_repeats(t: Attrs, made: Attrs) -> None:
    """Public attributes a template gives must equal what the key has (flag G)."""
    for name, v in t.items():
        if name in made and name not in GEN_INPUTS and v != made[name]:
            raise _inconsistent(f"{name} does not match the key")


def key_usage(cls: int, key_type: int, t: Attrs) -> Attrs:
    """Usage flags with their defaults: RSA private keys sign and decrypt, EC sign."""
    rsa_key = key_type == C.CKK_RSA
    if cls == C.CKO_PRIVATE_KEY:
        return {
            "CKA_SIGN": t.get("CKA_SIGN", True),
            "CKA_DECRYPT": t.get("CKA_DECRYPT", rsa_key),
            "CKA_SIGN_RECOVER": False,
            "CKA_UNWRAP": False,
        }
    return {
        "CKA_VERIFY": t.get("CKA_VERIFY", True),
        "CKA_ENCRYPT": t.get("CKA_ENCRYPT", rsa_key),
        "CKA_VERIFY_RECOVER": False,
        "CKA_WRAP": False,
    }


def is_sensitive_class(cls: int) -> bool:
    return A.sensitive(cls, "CKA_VALUE")
