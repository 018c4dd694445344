"""The one mechanism table.

A row per mechanism: PKCS#11 flags, the key types it takes, key size range (bytes), the kind of
parameter it needs, its fixed output length where there is one, and the key service operation that
carries it out. C_GetMechanismList/Info, template validation, the key service, ckmechinfo and the
tests all read this table; adding a mechanism is one row here plus its server operation.
"""

from __future__ import annotations

from enum import Enum
from functools import cached_property

from pkcs11ws import constants as C
from pkcs11ws._lite import dataclass

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from typing import Final


class Param(Enum):
    """What C_*Init expects in CK_MECHANISM.pParameter."""

    NONE = "none"  # no parameter allowed
    IV16 = "iv16"  # a 16-byte initialisation vector
    MAC_LEN = "mac_len"  # CK_MAC_GENERAL_PARAMS (a CK_ULONG output length)


class Op(Enum):
    """The key service operation that performs the mechanism."""

    CIPHER = "cipher"  # /crypto/v1/encrypt and /crypto/v1/decrypt
    MAC = "mac"  # /crypto/v1/sign and /crypto/v1/verify
    KEYGEN = "keygen"  # /km/v1/softcards/{card}/keys/generate


@dataclass(frozen=True)
class Mechanism:
    name: str
    code: int
    flags: int
    key_types: tuple[int, ...]
    min_key: int  # bytes
    max_key: int  # bytes
    param: Param
    op: Op
    digest: str = ""  # hash for HMAC mechanisms
    out_len: int = 0  # full MAC length for HMAC mechanisms
    padded: bool = False  # CBC-PAD (PKCS#7 padding)
    gen_key_type: int = -1  # key type a KEYGEN mechanism makes

    @cached_property
    def general(self) -> bool:
        """The caller picks the MAC length (CK_MAC_GENERAL_PARAMS). Cached in the instance:
        the sign and verify path reads it per call."""
        return self.param is Param.MAC_LEN


_AES = (C.CKK_AES,)
HMAC_MAX_KEY: Final = 1024
_CIPHER_FLAGS = C.CKF_ENCRYPT | C.CKF_DECRYPT
_MAC_FLAGS = C.CKF_SIGN | C.CKF_VERIFY


def _hmac_rows(bits: int, key_type: int, code: int, code_general: int) -> list[Mechanism]:
    digest = f"sha{bits}"
    kt = (key_type, C.CKK_GENERIC_SECRET)
    # Key sizes in bytes: any length HMAC accepts, up to the limit the key service stores.
    return [
        Mechanism(f"CKM_SHA{bits}_HMAC", code, _MAC_FLAGS, kt, 1, HMAC_MAX_KEY, Param.NONE,
                  Op.MAC, digest, bits // 8),
        Mechanism(f"CKM_SHA{bits}_HMAC_GENERAL", code_general, _MAC_FLAGS, kt, 1, HMAC_MAX_KEY,
                  Param.MAC_LEN, Op.MAC, digest, bits // 8),
    ]  # fmt: skip


MECHANISMS: Final[tuple[Mechanism, ...]] = (
    Mechanism("CKM_AES_CBC", C.CKM_AES_CBC, _CIPHER_FLAGS, _AES, 16, 32, Param.IV16, Op.CIPHER),
    Mechanism("CKM_AES_CBC_PAD", C.CKM_AES_CBC_PAD, _CIPHER_FLAGS, _AES, 16, 32, Param.IV16,
              Op.CIPHER, padded=True),
    Mechanism("CKM_AES_KEY_GEN", C.CKM_AES_KEY_GEN, C.CKF_GENERATE, _AES, 16, 32, Param.NONE,
              Op.KEYGEN, gen_key_type=C.CKK_AES),
    *_hmac_rows(256, C.CKK_SHA256_HMAC, C.CKM_SHA256_HMAC, C.CKM_SHA256_HMAC_GENERAL),
    *_hmac_rows(384, C.CKK_SHA384_HMAC, C.CKM_SHA384_HMAC, C.CKM_SHA384_HMAC_GENERAL),
    *_hmac_rows(512, C.CKK_SHA512_HMAC, C.CKM_SHA512_HMAC, C.CKM_SHA512_HMAC_GENERAL),
    Mechanism("CKM_SHA256_KEY_GEN", C.CKM_SHA256_KEY_GEN, C.CKF_GENERATE, (C.CKK_SHA256_HMAC,),
              1, HMAC_MAX_KEY, Param.NONE, Op.KEYGEN, gen_key_type=C.CKK_SHA256_HMAC),
    Mechanism("CKM_SHA384_KEY_GEN", C.CKM_SHA384_KEY_GEN, C.CKF_GENERATE, (C.CKK_SHA384_HMAC,),
              1, HMAC_MAX_KEY, Param.NONE, Op.KEYGEN, gen_key_type=C.CKK_SHA384_HMAC),
    Mechanism("CKM_SHA512_KEY_GEN", C.CKM_SHA512_KEY_GEN, C.CKF_GENERATE, (C.CKK_SHA512_HMAC,),
              1, HMAC_MAX_KEY, Param.NONE, Op.KEYGEN, gen_key_type=C.CKK_SHA512_HMAC),
    Mechanism("CKM_GENERIC_SECRET_KEY_GEN", C.CKM_GENERIC_SECRET_KEY_GEN, C.CKF_GENERATE,
              (C.CKK_GENERIC_SECRET,), 1, HMAC_MAX_KEY, Param.NONE, Op.KEYGEN,
              gen_key_type=C.CKK_GENERIC_SECRET),
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
