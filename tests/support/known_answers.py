"""Published known-answer vectors shared by the consumer test suites (facts, not our output).

- NIST SP 800-38A, appendix F.2.1-F.2.6: CBC-AES128/192/256 encryption and decryption (four
  blocks, one IV).
- RFC 4231, test cases 1-7: HMAC-SHA-256/384/512 (case 5 is the truncated output).
"""

from __future__ import annotations

from dataclasses import dataclass

_h = bytes.fromhex

# ---- NIST SP 800-38A F.2 ---------------------------------------------------------------------

CBC_IV = _h("000102030405060708090a0b0c0d0e0f")
CBC_PLAINTEXT = _h(
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710"
)


@dataclass(frozen=True)
class CbcVector:
    name: str  # the SP 800-38A section: F.2.1/F.2.2 are one key's encryption and decryption
    key: bytes
    ciphertext: bytes


CBC_VECTORS = (
    CbcVector(
        "F.2.1-F.2.2 CBC-AES128",
        _h("2b7e151628aed2a6abf7158809cf4f3c"),
        _h(
            "7649abac8119b246cee98e9b12e9197d"
            "5086cb9b507219ee95db113a917678b2"
            "73bed6b8e3c1743b7116e69e22229516"
            "3ff1caa1681fac09120eca307586e1a7"
        ),
    ),
    CbcVector(
        "F.2.3-F.2.4 CBC-AES192",
        _h("8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b"),
        _h(
            "4f021db243bc633d7178183a9fa071e8"
            "b4d9ada9ad7dedf4e5e738763f69145a"
            "571b242012fb7ae07fa9baac3df102e0"
            "08b0e27988598881d920a9e64f5615cd"
        ),
    ),
    CbcVector(
        "F.2.5-F.2.6 CBC-AES256",
        _h("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"),
        _h(
            "f58c4c04d6e5f1ba779eabfb5f7bfbd6"
            "9cfc4e967edb808d679f777bc6702c7d"
            "39f23369a9d9bacfa530e26304231461"
            "b2eb05e2c39be9fcda6c19078c6a9d1b"
        ),
    ),
)

# ---- RFC 4231 --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HmacVector:
    case: int
    key: bytes
    data: bytes
    sha256: bytes
    sha384: bytes
    sha512: bytes
    truncated: int = 0  # case 5: only the first 16 bytes are given (and compared)

    def mac(self, bits: int) -> bytes:
        value: bytes = getattr(self, f"sha{bits}")
        return value


HMAC_VECTORS = (
    HmacVector(
        1,
        b"\x0b" * 20,
        b"Hi There",
        _h("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
        _h(
            "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
            "faea9ea9076ede7f4af152e8b2fa9cb6"
        ),
        _h(
            "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
            "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854"
        ),
    ),
    HmacVector(
        2,
        b"Jefe",
        b"what do ya want for nothing?",
        _h("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
        _h(
            "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
            "8e2240ca5e69e2c78b3239ecfab21649"
        ),
        _h(
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
            "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
        ),
    ),
    HmacVector(
        3,
        b"\xaa" * 20,
        b"\xdd" * 50,
        _h("773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
        _h(
            "88062608d3e6ad8a0aa2ace014c8a86f0aa635d947ac9febe83ef4e55966144b"
            "2a5ab39dc13814b94e3ab6e101a34f27"
        ),
        _h(
            "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39"
            "bf3e848279a722c806b485a47e67c807b946a337bee8942674278859e13292fb"
        ),
    ),
    HmacVector(
        4,
        bytes(range(1, 26)),
        b"\xcd" * 50,
        _h("82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
        _h(
            "3e8a69b7783c25851933ab6290af6ca77a9981480850009cc5577c6e1f573b4e"
            "6801dd23c4a7d679ccf8a386c674cffb"
        ),
        _h(
            "b0ba465637458c6990e5a8c5f61d4af7e576d97ff94b872de76f8050361ee3db"
            "a91ca5c11aa25eb4d679275cc5788063a5f19741120c4f2de2adebeb10a298dd"
        ),
    ),
    HmacVector(
        5,
        b"\x0c" * 20,
        b"Test With Truncation",
        _h("a3b6167473100ee06e0c796c2955552b"),
        _h("3abf34c3503b2a23a46efc619baef897"),
        _h("415fad6271580a531d4179bc891d87a6"),
        truncated=16,
    ),
    HmacVector(
        6,
        b"\xaa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        _h("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
        _h(
            "4ece084485813e9088d2c63a041bc5b44f9ef1012a2b588f3cd11f05033ac4c6"
            "0c2ef6ab4030fe8296248df163f44952"
        ),
        _h(
            "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f352"
            "6b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598"
        ),
    ),
    HmacVector(
        7,
        b"\xaa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size data."
        b" The key needs to be hashed before being used by the HMAC algorithm.",
        _h("9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
        _h(
            "6617178e941f020d351e2f254e8fd32c602420feb0b8fb9adccebb82461e99c5"
            "a678cc31e799176d3860e6110c46523e"
        ),
        _h(
            "e37b6a775dc87dbaa4dfa9f96e5e3ffddebd71f8867289865df5a32d20cdc944"
            "b6022cac3c4982b10d5eeb55c3e4de15134676fb6de0446065c97440fa8c6a58"
        ),
    ),
)
