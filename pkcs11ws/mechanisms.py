"""The one mechanism table.

A row per mechanism: PKCS#11 flags, the key types it takes, key size range, the kind of parameter
it needs (one parser per kind in the core), its family (one operations module per family in the
service), its output-length rule and its multi-part mode. C_GetMechanismList/Info, template
validation, the core's operation state, the key service, ckmechinfo and the tests all read this
table: a mechanism of an existing family is one row here.
"""

from __future__ import annotations

from pkcs11ws import constants as C
from pkcs11ws._lite import Enum, cached_property, dataclass

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Final


class Param(Enum):
    """What C_*Init expects in CK_MECHANISM.pParameter: one parser per kind in the core."""

    NONE = "none"  # no parameter allowed
    IV16 = "iv16"  # a 16-byte initialisation vector
    MAC_LEN = "mac_len"  # CK_MAC_GENERAL_PARAMS (a CK_ULONG output length)
    RSA_PSS = "rsa_pss"  # CK_RSA_PKCS_PSS_PARAMS (hash, MGF, salt length)
    RSA_OAEP = "rsa_oaep"  # CK_RSA_PKCS_OAEP_PARAMS (hash, MGF, label)
    GCM = "gcm"  # CK_GCM_PARAMS (IV, AAD, tag bits)


class Action(Enum):
    """What the key service does with the mechanism, so which endpoints carry it out. (An `op`
    is something else: the name of one protocol endpoint, protocol.Endpoint.op.)"""

    CIPHER = "cipher"  # /crypto/v1/encrypt and /crypto/v1/decrypt
    MAC = "mac"  # /crypto/v1/sign and /crypto/v1/verify (MACs and signatures)
    KEYGEN = "keygen"  # /km/v1/softcards/{card}/keys/generate
    KEYPAIR = "keypair"  # /km/v1/softcards/{card}/keys/generate-pair
    LOCAL = "local"  # none: the module does it (digests)


class Family(Enum):
    """Who carries a mechanism out: one operations module per family in the service
    (pkcs11ws/server/ops/) and one branch per family in the module."""

    AES_CBC = "aes_cbc"
    AES_GCM = "aes_gcm"
    HMAC = "hmac"
    SECRET_KEYGEN = "secret_keygen"
    RSA = "rsa"  # PKCS#1 v1.5, PSS, OAEP
    EC = "ec"  # ECDSA
    RSA_KEYGEN = "rsa_keygen"
    EC_KEYGEN = "ec_keygen"
    DIGEST = "digest"  # SHA-1 and SHA-2 digests, in the module (no key, no login)


class OutLen(Enum):
    """How long the output of one call is (the two-call convention answers without a trip)."""

    NONE = "none"  # key generation
    CBC = "cbc"  # the input, a whole number of blocks
    CBC_PAD = "cbc_pad"  # the input padded to the next block
    MAC = "mac"  # the MAC length (out_len, or the _GENERAL parameter)
    MODULUS = "modulus"  # RSA: the modulus in bytes (an upper bound for decryption)
    EC_SIG = "ec_sig"  # ECDSA: r || s, twice the field size in bytes
    GCM = "gcm"  # the input plus the tag (encrypt), an upper bound minus it (decrypt)
    DIGEST = "digest"  # the hash's length (out_len)


class Multi(Enum):
    """How C_*Update/C_*Final carry the mechanism out."""

    NONE = "none"  # single-part only (raw RSA, ECDSA over a digest)
    CBC = "cbc"  # streamed block by block, the chaining value kept in the core
    ACCUMULATE = "accumulate"  # the core buffers the data, Final makes the one request
    HASH = "hash"  # a running hash in the module, fed by each C_DigestUpdate


# The kinds the core switches on, with the prefix of their Cython enum: tools/gen_native.py
# emits pkcs11ws/_native/mech_gen.pxd from this (a kind's number is its position in its enum),
# and the core numbers each row's kinds by the same rule (kind_numbers below).
KINDS: Final = (("PARAM", Param), ("RULE", OutLen), ("MULTI", Multi), ("FAMILY", Family))


def kind_numbers() -> dict[Enum, int]:
    """Each kind's number in the core (its position in its enum, as mech_gen.pxd says)."""
    return {k: i for _, enum in KINDS for i, k in enumerate(enum)}


@dataclass(frozen=True)
class Mechanism:
    name: str
    code: int
    flags: int
    key_types: tuple[int, ...]
    min_key: int  # bytes for secret keys, bits for RSA and EC (as C_GetMechanismInfo says)
    max_key: int
    param: Param
    action: Action
    digest: str = ""  # the hash of HMAC, of the hash-and-sign RSA/ECDSA forms, of OAEP/PSS
    out_len: int = 0  # full MAC length for HMAC mechanisms
    padded: bool = False  # CBC-PAD (PKCS#7 padding)
    gen_key_type: int = -1  # key type a KEYGEN or KEYPAIR mechanism makes
    family: Family = Family.AES_CBC
    out: OutLen = OutLen.NONE
    multi: Multi = Multi.NONE

    @cached_property
    def general(self) -> bool:
        """The caller picks the MAC length (CK_MAC_GENERAL_PARAMS). Cached in the instance:
        the sign and verify path reads it per call."""
        return self.param is Param.MAC_LEN

    @property
    def key_classes(self) -> tuple[int, int, int, int]:
        """The object class of the key C_EncryptInit, C_DecryptInit, C_SignInit and
        C_VerifyInit take (the core checks it from this, per family)."""
        return FAMILY_KEY_CLASSES.get(self.family, _SECRET_ONLY)

    @property
    def private_key(self) -> bool:
        """The service's key for it is a key pair's private half (not a secret key)."""
        return C.CKO_PRIVATE_KEY in self.key_classes

    @property
    def key_sized(self) -> bool:
        """The output length is the key's (RSA modulus, ECDSA r || s), not the mechanism's."""
        return self.out in (OutLen.MODULUS, OutLen.EC_SIG)


# Per family: the class of the key for encrypt, decrypt, sign, verify (the C_*Init order). A key
# pair's private half signs and decrypts, its public half verifies and encrypts (in the module).
_SECRET_ONLY: Final = (C.CKO_SECRET_KEY,) * 4
_PAIR: Final = (C.CKO_PUBLIC_KEY, C.CKO_PRIVATE_KEY, C.CKO_PRIVATE_KEY, C.CKO_PUBLIC_KEY)
FAMILY_KEY_CLASSES: Final[dict[Family, tuple[int, int, int, int]]] = {
    Family.RSA: _PAIR,
    Family.EC: _PAIR,
}

_AES = (C.CKK_AES,)
HMAC_MAX_KEY: Final = 1024
_CIPHER_FLAGS = C.CKF_ENCRYPT | C.CKF_DECRYPT
_MAC_FLAGS = C.CKF_SIGN | C.CKF_VERIFY
_RSA = (C.CKK_RSA,)
_EC = (C.CKK_EC,)
RSA_BITS: Final = (2048, 3072, 4096)
EC_BITS: Final = (256, 521)
_EC_FLAGS = C.CKF_EC_F_P | C.CKF_EC_NAMED_CURVE | C.CKF_EC_UNCOMPRESS


def _hmac_rows(bits: int, key_type: int, code: int, code_general: int) -> list[Mechanism]:
    digest = f"sha{bits}"
    kt = (key_type, C.CKK_GENERIC_SECRET)
    # Key sizes in bytes: any length HMAC accepts, up to the limit the key service stores.
    return [
        Mechanism(f"CKM_SHA{bits}_HMAC", code, _MAC_FLAGS, kt, 1, HMAC_MAX_KEY, Param.NONE,
                  Action.MAC, digest, bits // 8, family=Family.HMAC, out=OutLen.MAC,
                  multi=Multi.ACCUMULATE),
        Mechanism(f"CKM_SHA{bits}_HMAC_GENERAL", code_general, _MAC_FLAGS, kt, 1, HMAC_MAX_KEY,
                  Param.MAC_LEN, Action.MAC, digest, bits // 8, family=Family.HMAC, out=OutLen.MAC,
                  multi=Multi.ACCUMULATE),
    ]  # fmt: skip


def _keygen(name: str, key_type: int, lo: int, hi: int) -> Mechanism:
    return Mechanism(
        name,
        getattr(C, name),
        C.CKF_GENERATE,
        (key_type,),
        lo,
        hi,
        Param.NONE,
        Action.KEYGEN,
        gen_key_type=key_type,
        family=Family.SECRET_KEYGEN,
    )


def _rsa(name: str, flags: int, param: Param, digest: str = "") -> Mechanism:
    """An RSA row: a digest means hash-and-sign, so the core accumulates multi-part data."""
    return Mechanism(
        name,
        getattr(C, name),
        flags,
        _RSA,
        RSA_BITS[0],
        RSA_BITS[-1],
        param,
        Action.CIPHER if flags & C.CKF_DECRYPT else Action.MAC,
        digest,
        family=Family.RSA,
        out=OutLen.MODULUS,
        multi=Multi.ACCUMULATE if digest else Multi.NONE,
    )


def _ecdsa(name: str, digest: str = "") -> Mechanism:
    return Mechanism(
        name,
        getattr(C, name),
        _MAC_FLAGS | _EC_FLAGS,
        _EC,
        EC_BITS[0],
        EC_BITS[1],
        Param.NONE,
        Action.MAC,
        digest,
        family=Family.EC,
        out=OutLen.EC_SIG,
        multi=Multi.ACCUMULATE if digest else Multi.NONE,
    )


def _digest(name: str, digest: str, size: int) -> Mechanism:
    return Mechanism(
        name,
        getattr(C, name),
        C.CKF_DIGEST,
        (),
        0,
        0,
        Param.NONE,
        Action.LOCAL,
        digest,
        size,
        family=Family.DIGEST,
        out=OutLen.DIGEST,
        multi=Multi.HASH,
    )


MECHANISMS: Final[tuple[Mechanism, ...]] = (
    Mechanism("CKM_AES_CBC", C.CKM_AES_CBC, _CIPHER_FLAGS, _AES, 16, 32, Param.IV16, Action.CIPHER,
              out=OutLen.CBC, multi=Multi.CBC),
    Mechanism("CKM_AES_CBC_PAD", C.CKM_AES_CBC_PAD, _CIPHER_FLAGS, _AES, 16, 32, Param.IV16,
              Action.CIPHER, padded=True, out=OutLen.CBC_PAD, multi=Multi.CBC),
    Mechanism("CKM_AES_GCM", C.CKM_AES_GCM, _CIPHER_FLAGS, _AES, 16, 32, Param.GCM, Action.CIPHER,
              family=Family.AES_GCM, out=OutLen.GCM, multi=Multi.ACCUMULATE),
    _keygen("CKM_AES_KEY_GEN", C.CKK_AES, 16, 32),
    *_hmac_rows(256, C.CKK_SHA256_HMAC, C.CKM_SHA256_HMAC, C.CKM_SHA256_HMAC_GENERAL),
    *_hmac_rows(384, C.CKK_SHA384_HMAC, C.CKM_SHA384_HMAC, C.CKM_SHA384_HMAC_GENERAL),
    *_hmac_rows(512, C.CKK_SHA512_HMAC, C.CKM_SHA512_HMAC, C.CKM_SHA512_HMAC_GENERAL),
    _keygen("CKM_SHA256_KEY_GEN", C.CKK_SHA256_HMAC, 1, HMAC_MAX_KEY),
    _keygen("CKM_SHA384_KEY_GEN", C.CKK_SHA384_HMAC, 1, HMAC_MAX_KEY),
    _keygen("CKM_SHA512_KEY_GEN", C.CKK_SHA512_HMAC, 1, HMAC_MAX_KEY),
    _keygen("CKM_GENERIC_SECRET_KEY_GEN", C.CKK_GENERIC_SECRET, 1, HMAC_MAX_KEY),
    Mechanism("CKM_RSA_PKCS_KEY_PAIR_GEN", C.CKM_RSA_PKCS_KEY_PAIR_GEN, C.CKF_GENERATE_KEY_PAIR,
              _RSA, RSA_BITS[0], RSA_BITS[-1], Param.NONE, Action.KEYPAIR, gen_key_type=C.CKK_RSA,
              family=Family.RSA_KEYGEN),
    Mechanism("CKM_EC_KEY_PAIR_GEN", C.CKM_EC_KEY_PAIR_GEN,
              C.CKF_GENERATE_KEY_PAIR | _EC_FLAGS, _EC, EC_BITS[0], EC_BITS[1], Param.NONE,
              Action.KEYPAIR, gen_key_type=C.CKK_EC, family=Family.EC_KEYGEN),
    _rsa("CKM_RSA_PKCS", _CIPHER_FLAGS | _MAC_FLAGS, Param.NONE),
    _rsa("CKM_SHA224_RSA_PKCS", _MAC_FLAGS, Param.NONE, "sha224"),
    _rsa("CKM_SHA256_RSA_PKCS", _MAC_FLAGS, Param.NONE, "sha256"),
    _rsa("CKM_SHA384_RSA_PKCS", _MAC_FLAGS, Param.NONE, "sha384"),
    _rsa("CKM_SHA512_RSA_PKCS", _MAC_FLAGS, Param.NONE, "sha512"),
    _rsa("CKM_RSA_PKCS_PSS", _MAC_FLAGS, Param.RSA_PSS),
    _rsa("CKM_SHA224_RSA_PKCS_PSS", _MAC_FLAGS, Param.RSA_PSS, "sha224"),
    _rsa("CKM_SHA256_RSA_PKCS_PSS", _MAC_FLAGS, Param.RSA_PSS, "sha256"),
    _rsa("CKM_SHA384_RSA_PKCS_PSS", _MAC_FLAGS, Param.RSA_PSS, "sha384"),
    _rsa("CKM_SHA512_RSA_PKCS_PSS", _MAC_FLAGS, Param.RSA_PSS, "sha512"),
    _rsa("CKM_RSA_PKCS_OAEP", _CIPHER_FLAGS, Param.RSA_OAEP),
    _ecdsa("CKM_ECDSA"),
    _ecdsa("CKM_ECDSA_SHA224", "sha224"),
    _ecdsa("CKM_ECDSA_SHA256", "sha256"),
    _ecdsa("CKM_ECDSA_SHA384", "sha384"),
    _ecdsa("CKM_ECDSA_SHA512", "sha512"),
    _digest("CKM_SHA_1", "sha1", 20),
    _digest("CKM_SHA224", "sha224", 28),
    _digest("CKM_SHA256", "sha256", 32),
    _digest("CKM_SHA384", "sha384", 48),
    _digest("CKM_SHA512", "sha512", 64),
)  # fmt: skip

BY_CODE: Final[dict[int, Mechanism]] = {m.code: m for m in MECHANISMS}
BY_NAME: Final[dict[str, Mechanism]] = {m.name: m for m in MECHANISMS}

AES_KEY_SIZES: Final = (16, 24, 32)
AES_BLOCK: Final = 16

# Key types the service stores, and the key generation mechanism that makes each.
KEY_TYPE_NAMES: Final[dict[int, str]] = {
    C.CKK_AES: "CKK_AES",
    C.CKK_SHA256_HMAC: "CKK_SHA256_HMAC",
    C.CKK_SHA384_HMAC: "CKK_SHA384_HMAC",
    C.CKK_SHA512_HMAC: "CKK_SHA512_HMAC",
    C.CKK_GENERIC_SECRET: "CKK_GENERIC_SECRET",
}
# Asymmetric key types: held as key pairs (CKO_PRIVATE_KEY sealed, CKO_PUBLIC_KEY public).
PAIR_KEY_TYPE_NAMES: Final[dict[int, str]] = {C.CKK_RSA: "CKK_RSA", C.CKK_EC: "CKK_EC"}

# PKCS#11 hash and MGF1 codes (PSS and OAEP parameters) by hash name.
# The core's parameter parsers accept exactly these (copied into it at import).
HASHES: Final[dict[int, str]] = {
    C.CKM_SHA_1: "sha1",
    C.CKM_SHA224: "sha224",
    C.CKM_SHA256: "sha256",
    C.CKM_SHA384: "sha384",
    C.CKM_SHA512: "sha512",
}
MGFS: Final[dict[int, str]] = {
    C.CKG_MGF1_SHA1: "sha1",
    C.CKG_MGF1_SHA224: "sha224",
    C.CKG_MGF1_SHA256: "sha256",
    C.CKG_MGF1_SHA384: "sha384",
    C.CKG_MGF1_SHA512: "sha512",
}


def by_code(code: int) -> Mechanism | None:
    return BY_CODE.get(code)


def by_name(name: str) -> Mechanism | None:
    return BY_NAME.get(name)


def key_size_ok(key_type: int, length: int) -> bool:
    """Whether a secret key of this type may have this many bytes."""
    if key_type == C.CKK_AES:
        return length in AES_KEY_SIZES
    if key_type in KEY_TYPE_NAMES:
        return 1 <= length <= HMAC_MAX_KEY
    return False


# The curves CKM_EC_KEY_PAIR_GEN makes: CKA_EC_PARAMS (DER of the curve's OID) -> field bits.
EC_CURVE_BITS: Final[dict[bytes, int]] = {
    bytes.fromhex("06082a8648ce3d030107"): 256,  # P-256 (prime256v1, secp256r1)
    bytes.fromhex("06052b81040022"): 384,  # P-384 (secp384r1)
    bytes.fromhex("06052b81040023"): 521,  # P-521 (secp521r1)
}


def signature_size(attrs: Mapping[str, object]) -> int:
    """The output length of a key pair half: RSA the modulus' bytes, ECDSA r || s; else 0."""
    kt = attrs.get("CKA_KEY_TYPE")
    if kt == C.CKK_RSA:
        bits = attrs.get("CKA_MODULUS_BITS")
        return (bits + 7) // 8 if isinstance(bits, int) else 0
    if kt == C.CKK_EC:
        params = attrs.get("CKA_EC_PARAMS")
        bits = EC_CURVE_BITS.get(params, 0) if isinstance(params, bytes) else 0
        return 2 * ((bits + 7) // 8)
    return 0
