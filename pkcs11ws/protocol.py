"""The wire protocol between the module (client) and the key service: written down once.

JSON over HTTPS with mutual TLS. Binary fields travel as standard base64. This module owns:
the attribute table (which CKA travels and how), the request/response structures, the endpoint
table, the error codes with their HTTP status and the CKR each maps to, strict decoding (unknown
fields and malformed base64 are rejected), and the OpenAPI and Markdown renderings of all of it.
The client (pkcs11ws.client) and the server (pkcs11ws.server) both import it; nothing else defines
a field or an error.
"""

from __future__ import annotations

import binascii

from pkcs11ws import constants as C
from pkcs11ws._lite import dataclass, field

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from typing import Any, Final

VERSION: Final = "1.0"
OPENAPI_PATH: Final = "/openapi.json"
HEALTH_PATH: Final = "/health"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
REQUEST_ID_HEADER: Final = "X-Request-Id"  # sent by the module, written in both logs
TOKEN_HEADER: Final = "Authorization"  # "Bearer <activation token>"
# The crypto requests (Cipher, Sign, Verify) may carry the token in the body instead, as their
# first field: the module does, since a client formats every header byte (libcurl: about 100
# instructions a byte) and copies a body. One request carries it in one place only.
TOKEN_FIELD: Final = "token"
MAX_TOKEN: Final = 4096
# Likewise their request id, and a batch's: the body's first field instead of the X-Request-Id
# header (a header that changes per request also makes the client rebuild its header list).
REQUEST_ID_FIELD: Final = "request_id"
MAX_PASSPHRASE: Final = 256
# REQUEST_ID_RE, NAME_RE and IDEMPOTENCY_RE are compiled when first used (see __getattr__):
# the service matches them on every request, the module on none, and `re` costs every process
# that loads the module ~7 M instructions to import.
_PATTERNS: Final = {
    "REQUEST_ID_RE": r"^[A-Za-z0-9_.:-]{1,64}$",
    "NAME_RE": r"^[A-Za-z0-9]{1,64}$",
    "IDEMPOTENCY_RE": r"^[A-Za-z0-9_.:-]{8,128}$",
}
if TYPE_CHECKING:
    import re

    REQUEST_ID_RE: re.Pattern[str]
    NAME_RE: re.Pattern[str]
    IDEMPOTENCY_RE: re.Pattern[str]
    # The error and attribute tables (~90 records) are built when first read (see __getattr__):
    # the service's paths and the module's error and object paths read them; `pkcs11-tool -L`
    # never does, and every run of it would otherwise build them.
    ERRORS: dict[str, ErrorCode]
    ATTRIBUTES: tuple[Attr, ...]
    ATTR_BY_NAME: dict[str, Attr]
    ATTR_BY_CODE: dict[int, Attr]


def __getattr__(name: str) -> object:
    """One of _PATTERNS compiled, or a table of _TABLES built, on first use; then a plain
    module attribute (later reads never come here)."""
    build = _TABLES.get(name)
    if build is not None:
        build()
        return globals()[name]
    source = _PATTERNS.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import re

    compiled = globals()[name] = re.compile(source)
    return compiled


class ProtocolError(Exception):
    """A request or response that does not fit the schema; code is one of ERRORS."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------------
# Errors: stable code -> HTTP status and the CKR the module returns for it.


@dataclass(frozen=True)
class ErrorCode:
    code: str
    http: int
    ckr: int
    doc: str


def _error_rows() -> tuple[ErrorCode, ...]:
    return (
        ErrorCode("BAD_REQUEST", 400, C.CKR_ARGUMENTS_BAD, "Body not JSON or off the schema."),
        ErrorCode("UNKNOWN_FIELD", 400, C.CKR_ARGUMENTS_BAD, "A field the schema does not know."),
        ErrorCode("BAD_BASE64", 400, C.CKR_ARGUMENTS_BAD, "A binary field is not strict base64."),
        ErrorCode("IDEMPOTENCY_KEY_REQUIRED", 400, C.CKR_ARGUMENTS_BAD,
                  "A create or destroy request without a valid Idempotency-Key header."),
        ErrorCode("IDEMPOTENCY_CONFLICT", 422, C.CKR_FUNCTION_FAILED,
                  "The Idempotency-Key was used before for a different request."),
        ErrorCode("NOT_FOUND", 404, C.CKR_FUNCTION_NOT_SUPPORTED, "No such endpoint."),
        ErrorCode("METHOD_NOT_ALLOWED", 405, C.CKR_FUNCTION_NOT_SUPPORTED,
                  "The endpoint exists but not with this method."),
        ErrorCode("BODY_TOO_LARGE", 413, C.CKR_DATA_LEN_RANGE,
                  "The request body is over the service's configured limit."),
        ErrorCode("INVALID_NAME", 400, C.CKR_ARGUMENTS_BAD,
                  "Softcard names are 1-64 letters and digits (no special characters)."),
        ErrorCode("PASSPHRASE_LEN_RANGE", 400, C.CKR_PIN_LEN_RANGE,
                  "Passphrases are 1 to 256 bytes; a new softcard's at least the service's "
                  "minimum (server.yaml passphrase_min_length, default 8)."),
        ErrorCode("SOFTCARD_EXISTS", 409, C.CKR_FUNCTION_FAILED, "A softcard has that name."),
        ErrorCode("SOFTCARD_NOT_FOUND", 404, C.CKR_TOKEN_NOT_PRESENT, "No softcard with that ID."),
        ErrorCode("SOFTCARD_NOT_EMPTY", 409, C.CKR_FUNCTION_FAILED,
                  "The softcard still holds keys; delete them first or force."),
        ErrorCode("PASSPHRASE_INCORRECT", 403, C.CKR_PIN_INCORRECT, "Wrong passphrase."),
        ErrorCode("PASSPHRASE_LOCKED", 429, C.CKR_PIN_LOCKED,
                  "Too many wrong passphrases: the card refuses activation for a while "
                  "(the message says how long)."),
        ErrorCode("NOT_ACTIVATED", 401, C.CKR_USER_NOT_LOGGED_IN,
                  "No, an expired or a revoked activation token for this softcard."),
        ErrorCode("OBJECT_NOT_FOUND", 404, C.CKR_OBJECT_HANDLE_INVALID, "No such object."),
        ErrorCode("KEY_NOT_FOUND", 404, C.CKR_KEY_HANDLE_INVALID, "No such key."),
        ErrorCode("KEY_TYPE_INCONSISTENT", 400, C.CKR_KEY_TYPE_INCONSISTENT,
                  "The key's type does not fit the mechanism."),
        ErrorCode("KEY_FUNCTION_NOT_PERMITTED", 403, C.CKR_KEY_FUNCTION_NOT_PERMITTED,
                  "The key's usage flags (CKA_ENCRYPT/DECRYPT/SIGN/VERIFY) forbid this."),
        ErrorCode("KEY_SIZE_RANGE", 400, C.CKR_KEY_SIZE_RANGE, "Key length not allowed."),
        ErrorCode("MECHANISM_INVALID", 400, C.CKR_MECHANISM_INVALID,
                  "Unknown mechanism or not valid for this operation."),
        ErrorCode("MECHANISM_PARAM_INVALID", 400, C.CKR_MECHANISM_PARAM_INVALID,
                  "Missing or wrong-length IV, or MAC length out of range."),
        ErrorCode("DATA_LEN_RANGE", 400, C.CKR_DATA_LEN_RANGE,
                  "Plaintext not a multiple of 16 bytes for CKM_AES_CBC."),
        ErrorCode("ENCRYPTED_DATA_LEN_RANGE", 400, C.CKR_ENCRYPTED_DATA_LEN_RANGE,
                  "Ciphertext not a non-zero multiple of 16 bytes."),
        ErrorCode("ENCRYPTED_DATA_INVALID", 400, C.CKR_ENCRYPTED_DATA_INVALID, "Bad padding."),
        ErrorCode("SIGNATURE_INVALID", 422, C.CKR_SIGNATURE_INVALID, "The MAC does not verify."),
        ErrorCode("SIGNATURE_LEN_RANGE", 422, C.CKR_SIGNATURE_LEN_RANGE,
                  "The MAC has the wrong length for the mechanism."),
        ErrorCode("TEMPLATE_INCOMPLETE", 400, C.CKR_TEMPLATE_INCOMPLETE,
                  "A required attribute is missing."),
        ErrorCode("TEMPLATE_INCONSISTENT", 400, C.CKR_TEMPLATE_INCONSISTENT,
                  "Attributes contradict each other or the service's rules."),
        ErrorCode("ATTRIBUTE_TYPE_INVALID", 400, C.CKR_ATTRIBUTE_TYPE_INVALID,
                  "An attribute this object class does not have."),
        ErrorCode("ATTRIBUTE_VALUE_INVALID", 400, C.CKR_ATTRIBUTE_VALUE_INVALID,
                  "An attribute value the service refuses (for example CKA_VALUE not DER X.509)."),
        ErrorCode("ATTRIBUTE_READ_ONLY", 400, C.CKR_ATTRIBUTE_READ_ONLY,
                  "An attribute that cannot be changed (only CKA_LABEL and CKA_ID can)."),
        ErrorCode("ACTION_PROHIBITED", 403, C.CKR_ACTION_PROHIBITED,
                  "The object's CKA_COPYABLE or CKA_MODIFIABLE is false."),
        ErrorCode("CLIENT_NOT_AUTHORIZED", 403, C.CKR_DEVICE_ERROR,
                  "The client certificate is not listed in the service's clients file, or was "
                  "revoked: no request is served over it."),
        ErrorCode("FORBIDDEN", 403, C.CKR_ACTION_PROHIBITED,
                  "Only the softcard's owner or an admin may do this (delete, grants)."),
        ErrorCode("UNKNOWN_CLIENT", 400, C.CKR_ARGUMENTS_BAD,
                  "A grant names an identity the service does not know."),
        ErrorCode("BATCH_TOO_LARGE", 413, C.CKR_DEVICE_ERROR,
                  "A batch with more operations or bytes than the service's batch.max_items / "
                  "batch.max_bytes (the module splits its batches below its BATCHSIZE)."),
        ErrorCode("INTERNAL", 500, C.CKR_DEVICE_ERROR, "An unexpected failure in the service."),
        ErrorCode("UNAVAILABLE", 503, C.CKR_DEVICE_ERROR, "The service is starting or stopping."),
    )  # fmt: skip


def _errors() -> dict[str, ErrorCode]:
    """ERRORS, built on first use (see __getattr__)."""
    g = globals()
    table: dict[str, ErrorCode] | None = g.get("ERRORS")
    if table is None:
        table = g["ERRORS"] = {e.code: e for e in _error_rows()}
    return table


def ckr_for(code: str, http: int = 0) -> int:
    """The CKR for an error code; unknown codes fall back on the HTTP status (design.md 4)."""
    err = _errors().get(code)
    if err is not None:
        return err.ckr
    if http in (401, 403):
        return C.CKR_USER_NOT_LOGGED_IN
    if http == 404:
        return C.CKR_OBJECT_HANDLE_INVALID
    if http == 413:
        return C.CKR_DATA_LEN_RANGE
    if 400 <= http < 500:
        return C.CKR_ARGUMENTS_BAD
    return C.CKR_DEVICE_ERROR


# --------------------------------------------------------------------------------------------
# Attributes: which CKA travel, and as what JSON type.

BOOL, ULONG, BYTES, ULONGS = "bool", "ulong", "bytes", "ulongs"  # ULONGS: a CK_ULONG array


@dataclass(frozen=True)
class Attr:
    name: str
    code: int
    kind: str  # BOOL | ULONG | BYTES | ULONGS


def _attributes() -> dict[str, Attr]:
    """ATTR_BY_NAME, built on first use with ATTRIBUTES and ATTR_BY_CODE (see __getattr__)."""
    g = globals()
    by_name: dict[str, Attr] | None = g.get("ATTR_BY_NAME")
    if by_name is not None:
        return by_name
    rows = (
        ("CKA_CLASS", ULONG), ("CKA_TOKEN", BOOL), ("CKA_PRIVATE", BOOL), ("CKA_LABEL", BYTES),
        ("CKA_APPLICATION", BYTES), ("CKA_VALUE", BYTES), ("CKA_OBJECT_ID", BYTES),
        ("CKA_CERTIFICATE_TYPE", ULONG), ("CKA_ISSUER", BYTES), ("CKA_SERIAL_NUMBER", BYTES),
        ("CKA_TRUSTED", BOOL), ("CKA_CERTIFICATE_CATEGORY", ULONG), ("CKA_CHECK_VALUE", BYTES),
        ("CKA_KEY_TYPE", ULONG), ("CKA_SUBJECT", BYTES), ("CKA_ID", BYTES),
        ("CKA_SENSITIVE", BOOL), ("CKA_ENCRYPT", BOOL), ("CKA_DECRYPT", BOOL), ("CKA_WRAP", BOOL),
        ("CKA_UNWRAP", BOOL), ("CKA_SIGN", BOOL), ("CKA_SIGN_RECOVER", BOOL),
        ("CKA_VERIFY", BOOL), ("CKA_VERIFY_RECOVER", BOOL), ("CKA_DERIVE", BOOL),
        ("CKA_START_DATE", BYTES), ("CKA_END_DATE", BYTES), ("CKA_VALUE_LEN", ULONG),
        ("CKA_EXTRACTABLE", BOOL), ("CKA_LOCAL", BOOL), ("CKA_NEVER_EXTRACTABLE", BOOL),
        ("CKA_ALWAYS_SENSITIVE", BOOL), ("CKA_KEY_GEN_MECHANISM", ULONG),
        ("CKA_MODIFIABLE", BOOL), ("CKA_COPYABLE", BOOL), ("CKA_DESTROYABLE", BOOL),
        ("CKA_WRAP_WITH_TRUSTED", BOOL), ("CKA_ALWAYS_AUTHENTICATE", BOOL),
        ("CKA_MODULUS", BYTES), ("CKA_MODULUS_BITS", ULONG), ("CKA_PUBLIC_EXPONENT", BYTES),
        ("CKA_PRIVATE_EXPONENT", BYTES), ("CKA_PRIME_1", BYTES), ("CKA_PRIME_2", BYTES),
        ("CKA_EXPONENT_1", BYTES), ("CKA_EXPONENT_2", BYTES), ("CKA_COEFFICIENT", BYTES),
        ("CKA_PUBLIC_KEY_INFO", BYTES), ("CKA_EC_PARAMS", BYTES), ("CKA_EC_POINT", BYTES),
        ("CKA_ALLOWED_MECHANISMS", ULONGS),
    )  # fmt: skip
    table = tuple(Attr(n, getattr(C, n), k) for n, k in rows)
    g["ATTRIBUTES"] = table
    g["ATTR_BY_CODE"] = {a.code: a for a in table}
    by_name = g["ATTR_BY_NAME"] = {a.name: a for a in table}
    return by_name


_TABLES: Final = {
    "ERRORS": _errors,
    "ATTRIBUTES": _attributes,
    "ATTR_BY_NAME": _attributes,
    "ATTR_BY_CODE": _attributes,
}

AttrValue = bool | int | bytes | tuple[int, ...]
Attrs = dict[str, AttrValue]


# The operations a batch may carry: the ones that change nothing (creates and destroys keep their
# idempotent single requests).
BATCHABLE: Final = frozenset({"sign", "verify", "encrypt", "decrypt", "random"})
BATCH_PATH: Final = "/crypto/v1/batch"


# --------------------------------------------------------------------------------------------
# Structures: a field is (name, kind, required). Kinds: str, bytes (base64), int, bool, attrs,
# object (any JSON object, decoded later by its own struct), or the name of another structure,
# optionally as "list:NAME".


@dataclass(frozen=True)
class Field:
    name: str
    kind: str
    required: bool = True
    doc: str = ""
    max_len: int = 0  # for str/bytes: maximum length in characters/bytes (0: no limit)


@dataclass(frozen=True)
class Struct:
    name: str
    fields: tuple[Field, ...]
    doc: str = ""
    by_name: dict[str, Field] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.by_name.update({f.name: f for f in self.fields})


def _s(name: str, doc: str, *fields: Field) -> Struct:
    return Struct(name, tuple(fields), doc)


F = Field
# The first fields of the crypto requests (see TOKEN_FIELD, REQUEST_ID_FIELD): the client's
# cached head of a request (token, key, mechanism) then ends right before the data.
_TOKEN: Final = F(
    TOKEN_FIELD,
    "str",
    required=False,
    max_len=MAX_TOKEN,
    doc="the activation token, instead of the Authorization header (never both)",
)
_REQUEST_ID: Final = F(
    REQUEST_ID_FIELD,
    "str",
    required=False,
    max_len=64,
    doc="the request id (as X-Request-Id), instead of the header; it wins over the header's",
)
STRUCTS: Final[dict[str, Struct]] = {
    s.name: s
    for s in (
        _s("Empty", "No fields."),
        _s("Health", "Service liveness.", F("status", "str"), F("version", "str"),
           F("protocol", "str")),
        _s("SoftcardCreate", "Create a softcard.",
           F("name", "str", doc="letters and digits, 1-64", max_len=64),
           F("passphrase", "bytes", doc="passphrase_min_length (default 8) to 256 bytes",
             max_len=MAX_PASSPHRASE)),
        _s("Softcard", "A softcard (protection domain).",
           F("id", "str", doc="UUID of the softcard"), F("name", "str"),
           F("keys", "int", doc="number of secret keys"),
           F("certificates", "int", doc="number of certificates"),
           F("data", "int", doc="number of data objects"), F("created", "str"),
           F("failures", "int", required=False,
             doc="consecutive wrong passphrases since the last good one"),
           F("failure_threshold", "int", required=False,
             doc="the failures at which activation locks (server lockout.threshold)"),
           F("locked_for", "int", required=False,
             doc="seconds activation stays locked (0: not locked)"),
           F("owner", "str", required=False,
             doc="the identity that created it (absent: made before identities existed)")),
        _s("SoftcardList", "All softcards.", F("softcards", "list:Softcard")),
        _s("Activate", "Log in to a softcard.",
           F("passphrase", "bytes", max_len=MAX_PASSPHRASE)),
        _s("Activation", "A sealed activation token; send it as 'Authorization: Bearer TOKEN', or "
           "in the crypto requests' token field.",
           F("token", "str"), F("expires_in", "int", doc="seconds")),
        _s("Object", "A stored object: its handle (a UUID the service assigns; the module maps "
           "it to a PKCS#11 object handle of its own) and its readable attributes. "
           "CKA_VALUE of secret keys is never returned.",
           F("handle", "str"), F("attrs", "attrs")),
        _s("ObjectList", "Search results.", F("objects", "list:Object")),
        _s("ObjectCreate", "Create a data object, a certificate or import a secret key.",
           F("attrs", "attrs")),
        _s("Search", "Find objects whose attributes equal every given one (empty: all).",
           F("attrs", "attrs")),
        _s("ObjectCopy", "Copy an object; the copy takes the given attributes (CKA_LABEL, "
           "CKA_ID, CKA_PRIVATE of a certificate, CKA_COPYABLE/CKA_MODIFIABLE to false; any "
           "other must equal the original's).", F("attrs", "attrs")),
        _s("ObjectUpdate", "Change an object's CKA_LABEL and/or CKA_ID.", F("attrs", "attrs")),
        _s("KeyGenerate", "Generate a secret key in the service.",
           F("mechanism", "str", doc="CKM_AES_KEY_GEN, CKM_SHA256_KEY_GEN, ..."),
           F("attrs", "attrs")),
        _s("KeyPairGenerate", "Generate an RSA or EC key pair in the service.",
           F("mechanism", "str", doc="CKM_RSA_PKCS_KEY_PAIR_GEN or CKM_EC_KEY_PAIR_GEN"),
           F("public_attrs", "attrs"), F("private_attrs", "attrs")),
        _s("KeyPair", "The two halves of a new key pair.",
           F("public", "Object"), F("private", "Object")),
        _s("Cipher", "Encryption or decryption: AES-CBC(-PAD), AES-GCM, RSA (private key).",
           _REQUEST_ID, _TOKEN, F("key", "str", doc="the key object's handle (UUID)"),
           F("mechanism", "str"), F("data", "bytes"),
           F("iv", "bytes", required=False, doc="AES-CBC: 16 bytes; AES-GCM: 8-128 bytes"),
           F("aad", "bytes", required=False, doc="AES-GCM additional authenticated data"),
           F("tag_bits", "int", required=False, doc="AES-GCM tag length in bits"),
           F("hash", "str", required=False, doc="RSA-OAEP hash: sha1, sha224 .. sha512"),
           F("mgf", "str", required=False, doc="RSA-OAEP MGF1 hash"),
           F("label", "bytes", required=False, doc="RSA-OAEP label")),
        _s("CipherResult", "The output, and the last ciphertext block (the IV that continues "
           "the chain for a following call).",
           F("data", "bytes"), F("last_block", "bytes")),
        _s("Sign", "HMAC over data, or an RSA/ECDSA signature with a private key.",
           _REQUEST_ID, _TOKEN, F("key", "str"), F("mechanism", "str"), F("data", "bytes"),
           F("mac_length", "int", required=False,
             doc="_GENERAL mechanisms: output length, half to full size"),
           F("hash", "str", required=False, doc="RSA-PSS hash: sha1, sha224 .. sha512"),
           F("mgf", "str", required=False, doc="RSA-PSS MGF1 hash"),
           F("salt_length", "int", required=False, doc="RSA-PSS salt length in bytes")),
        _s("Signature", "The MAC or signature (ECDSA: r || s).", F("signature", "bytes")),
        _s("Verify", "Check a MAC (constant time).",
           _REQUEST_ID, _TOKEN, F("key", "str"), F("mechanism", "str"),
           F("data", "bytes"), F("signature", "bytes"),
           F("mac_length", "int", required=False)),
        _s("Verified", "The MAC verified (a mismatch is the error SIGNATURE_INVALID).",
           F("valid", "bool")),
        _s("Random", "Random bytes.", F("length", "int", doc="1-65536")),
        _s("RandomResult", "Random bytes.", F("data", "bytes")),
        _s("Grant", "An identity allowed to use a softcard it does not own.",
           F("client", "str", doc="identity name")),
        _s("GrantList", "The identities granted use of a softcard.", F("grants", "list:Grant")),
        _s("BatchItem", "One operation of a batch: what its single request would carry.",
           F("op", "str", doc="one of " + ", ".join(sorted(BATCHABLE))),
           F("token", "str", required=False,
             doc="the activation token (the single request's 'Authorization: Bearer' value); or "
             "in the request's own token field (never both)"),
           F("request", "object", doc="the single endpoint's request body (its struct)")),
        _s("Batch", "Several read-only operations in one request (group commit).",
           _REQUEST_ID, F("items", "list:BatchItem")),
        _s("BatchAnswer", "One operation's outcome, in the order of the items.",
           F("status", "int", doc="the HTTP status its single request would have got"),
           F("answer", "object", doc="the single endpoint's response body, or an Error")),
        _s("BatchResult", "The outcomes, one per item, in order.",
           F("results", "list:BatchAnswer")),
        _s("Error", "Every failure.", F("code", "str"), F("message", "str")),
    )
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Endpoints.


@dataclass(frozen=True)
class Endpoint:
    op: str
    method: str
    path: str
    request: str  # struct name ("Empty" for none)
    response: str
    doc: str
    auth: bool = False  # needs an activation token for the softcard
    idempotent: bool = False  # needs an Idempotency-Key header (create/destroy)
    errors: tuple[str, ...] = ()
    query: tuple[str, ...] = ()  # query parameters (boolean flags)
    access: str = "any"  # who may call it: a key of ACCESS
    changes: bool = False  # a state change: audited when it succeeds (failures always are)

    @property
    def pattern(self) -> re.Pattern[str]:
        import re

        return re.compile(
            "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[A-Za-z0-9-]{1,64})", self.path) + "$"
        )


# Who may call an endpoint (every caller must first be a listed identity: CLIENT_NOT_AUTHORIZED).
# The service enforces these in one place (server/pipeline.py); the docs render this table.
ACCESS: Final[dict[str, str]] = {
    "any": "any listed identity (list shows an app identity only its own and granted softcards)",
    "card": "the softcard's owner, an identity it was granted to, or an admin; for anyone else "
    "the softcard does not exist (SOFTCARD_NOT_FOUND, the same answer as for a missing one)",
    "owner": "the softcard's owner or an admin; an identity it was granted to gets FORBIDDEN, "
    "anyone else SOFTCARD_NOT_FOUND",
    "token": "the identity the activation token was issued to, over a connection with that "
    "identity's certificate; any other connection gets NOT_ACTIVATED",
}
_CARD = "/km/v1/softcards/{card}"
_KEY_ERRS = (
    "NOT_ACTIVATED",
    "KEY_NOT_FOUND",
    "KEY_TYPE_INCONSISTENT",
    "KEY_FUNCTION_NOT_PERMITTED",
    "MECHANISM_INVALID",
    "MECHANISM_PARAM_INVALID",
)
ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    Endpoint("health", "GET", HEALTH_PATH, "Empty", "Health", "Liveness and versions."),
    Endpoint("list_softcards", "GET", "/km/v1/softcards", "Empty", "SoftcardList",
             "List softcards with their object counts."),
    Endpoint("create_softcard", "POST", "/km/v1/softcards", "SoftcardCreate", "Softcard",
             "Create a softcard protected by a passphrase; the caller becomes its owner.",
             idempotent=True, changes=True,
             errors=("INVALID_NAME", "PASSPHRASE_LEN_RANGE", "SOFTCARD_EXISTS")),
    Endpoint("get_softcard", "GET", _CARD, "Empty", "Softcard", "One softcard.",
             errors=("SOFTCARD_NOT_FOUND",), access="card"),
    Endpoint("delete_softcard", "DELETE", _CARD, "Empty", "Empty",
             "Delete a softcard; refused while it holds keys unless ?force=true.",
             idempotent=True, query=("force",),
             errors=("SOFTCARD_NOT_FOUND", "SOFTCARD_NOT_EMPTY", "FORBIDDEN"), access="owner",
             changes=True),
    Endpoint("activate", "POST", _CARD + "/activate", "Activate", "Activation",
             "Log in: check the passphrase and return a sealed activation token.",
             errors=("SOFTCARD_NOT_FOUND", "PASSPHRASE_INCORRECT", "PASSPHRASE_LOCKED",
                     "PASSPHRASE_LEN_RANGE"), access="card", changes=True),
    Endpoint("deactivate", "POST", _CARD + "/deactivate", "Empty", "Empty",
             "Log out: revoke the activation token.", auth=True, errors=("NOT_ACTIVATED",),
             access="token", changes=True),
    Endpoint("renew", "POST", _CARD + "/renew", "Empty", "Activation",
             "Renew a live activation: a fresh token for the same session, valid for the full "
             "lifetime again (the module calls it once a token is past half its life).",
             auth=True, errors=("NOT_ACTIVATED", "SOFTCARD_NOT_FOUND"), access="token",
             changes=True),
    Endpoint("list_grants", "GET", _CARD + "/grants", "Empty", "GrantList",
             "The identities the softcard is granted to.",
             errors=("SOFTCARD_NOT_FOUND", "FORBIDDEN"), access="owner"),
    Endpoint("grant", "PUT", _CARD + "/grants/{client}", "Empty", "Empty",
             "Let another identity see, activate (with the passphrase) and use the softcard.",
             errors=("SOFTCARD_NOT_FOUND", "FORBIDDEN", "UNKNOWN_CLIENT"), access="owner",
             changes=True),
    Endpoint("revoke_grant", "DELETE", _CARD + "/grants/{client}", "Empty", "Empty",
             "Withdraw a grant; the identity's activations of the softcard end at once.",
             errors=("SOFTCARD_NOT_FOUND", "FORBIDDEN", "UNKNOWN_CLIENT"), access="owner",
             changes=True),
    Endpoint("search_objects", "POST", _CARD + "/objects/search", "Search", "ObjectList",
             "Find objects by class, key type, label, id, application (any attributes).",
             auth=True, errors=("NOT_ACTIVATED", "ATTRIBUTE_TYPE_INVALID"), access="token"),
    Endpoint("create_object", "POST", _CARD + "/objects", "ObjectCreate", "Object",
             "Create a data object or X.509 certificate, or import a secret key.",
             auth=True, idempotent=True,
             errors=("NOT_ACTIVATED", "TEMPLATE_INCOMPLETE", "TEMPLATE_INCONSISTENT",
                     "ATTRIBUTE_TYPE_INVALID", "ATTRIBUTE_VALUE_INVALID", "KEY_SIZE_RANGE"),
             access="token", changes=True),
    Endpoint("search_public", "POST", _CARD + "/public/search", "Search", "ObjectList",
             "Find the softcard's public objects (certificates and public keys with CKA_PRIVATE "
             "false) without "
             "an activation token, as PKCS#11 shows them before C_Login.",
             errors=("SOFTCARD_NOT_FOUND", "ATTRIBUTE_TYPE_INVALID"), access="card"),
    Endpoint("copy_object", "POST", _CARD + "/objects/{handle}/copy", "ObjectCopy", "Object",
             "Copy an object under a new handle (C_CopyObject), changing the given attributes.",
             auth=True, idempotent=True,
             errors=("NOT_ACTIVATED", "OBJECT_NOT_FOUND", "ACTION_PROHIBITED",
                     "ATTRIBUTE_READ_ONLY", "ATTRIBUTE_TYPE_INVALID"), access="token",
             changes=True),
    Endpoint("update_object", "POST", _CARD + "/objects/{handle}/attributes", "ObjectUpdate",
             "Object", "Rename an object: set CKA_LABEL and/or CKA_ID (C_SetAttributeValue).",
             auth=True,
             errors=("NOT_ACTIVATED", "OBJECT_NOT_FOUND", "ACTION_PROHIBITED",
                     "ATTRIBUTE_READ_ONLY", "ATTRIBUTE_TYPE_INVALID"), access="token",
             changes=True),
    Endpoint("get_object", "GET", _CARD + "/objects/{handle}", "Empty", "Object",
             "One object's attributes.", auth=True, errors=("NOT_ACTIVATED", "OBJECT_NOT_FOUND"),
             access="token"),
    Endpoint("delete_object", "DELETE", _CARD + "/objects/{handle}", "Empty", "Empty",
             "Destroy an object.", auth=True, idempotent=True,
             errors=("NOT_ACTIVATED", "OBJECT_NOT_FOUND"), access="token", changes=True),
    Endpoint("generate_key", "POST", _CARD + "/keys/generate", "KeyGenerate", "Object",
             "Generate an AES or HMAC key; its value never leaves the service.",
             auth=True, idempotent=True,
             errors=("NOT_ACTIVATED", "MECHANISM_INVALID", "TEMPLATE_INCOMPLETE",
                     "TEMPLATE_INCONSISTENT", "KEY_SIZE_RANGE"), access="token", changes=True),
    Endpoint("generate_key_pair", "POST", _CARD + "/keys/generate-pair", "KeyPairGenerate",
             "KeyPair", "Generate an RSA or EC key pair; the private key never leaves the "
             "service, the public key is a public object.", auth=True, idempotent=True,
             errors=("NOT_ACTIVATED", "MECHANISM_INVALID", "TEMPLATE_INCOMPLETE",
                     "TEMPLATE_INCONSISTENT", "ATTRIBUTE_VALUE_INVALID", "KEY_SIZE_RANGE"),
             access="token", changes=True),
    Endpoint("encrypt", "POST", "/crypto/v1/encrypt", "Cipher", "CipherResult",
             "AES-CBC(-PAD) or AES-GCM encryption.", auth=True,
             errors=(*_KEY_ERRS, "DATA_LEN_RANGE"), access="token"),
    Endpoint("decrypt", "POST", "/crypto/v1/decrypt", "Cipher", "CipherResult",
             "AES-CBC(-PAD), AES-GCM or RSA (PKCS#1 v1.5, OAEP) decryption.", auth=True,
             errors=(*_KEY_ERRS, "ENCRYPTED_DATA_LEN_RANGE", "ENCRYPTED_DATA_INVALID"),
             access="token"),
    Endpoint("sign", "POST", "/crypto/v1/sign", "Sign", "Signature",
             "HMAC, RSA (PKCS#1 v1.5, PSS) or ECDSA signature.", auth=True,
             errors=(*_KEY_ERRS, "DATA_LEN_RANGE"), access="token"),
    Endpoint("verify", "POST", "/crypto/v1/verify", "Verify", "Verified", "HMAC verify.",
             auth=True, errors=(*_KEY_ERRS, "SIGNATURE_INVALID", "SIGNATURE_LEN_RANGE"),
             access="token"),
    Endpoint("random", "POST", "/crypto/v1/random", "Random", "RandomResult",
             "Random bytes from the service's CSPRNG (no login needed).",
             errors=("BAD_REQUEST",)),
    Endpoint("batch", "POST", BATCH_PATH, "Batch", "BatchResult",
             "Group commit: several sign/verify/encrypt/decrypt/random operations, each with "
             "its own token, answered in order, each with its own status and answer. Every "
             "item passes the same authorization, audit and checks as its single request; a "
             "refused item fails alone. Limits: batch.max_items, batch.max_bytes.",
             errors=("BATCH_TOO_LARGE",)),
)  # fmt: skip
ENDPOINT_BY_OP: Final[dict[str, Endpoint]] = {e.op: e for e in ENDPOINTS}
COMMON_ERRORS: Final = (
    "BAD_REQUEST",
    "UNKNOWN_FIELD",
    "BAD_BASE64",
    "BODY_TOO_LARGE",
    "CLIENT_NOT_AUTHORIZED",
    "INTERNAL",
    "UNAVAILABLE",
)


def path_for(op: str, **params: str) -> str:
    """The concrete path of an endpoint, e.g. path_for("activate", card=uuid)."""
    return ENDPOINT_BY_OP[op].path.format(**params)


# --------------------------------------------------------------------------------------------
# Encoding and strict decoding.


def b64e(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


# The characters whose 6-bit value has its low 4 (or 2) bits zero: what the last character
# before "==" (or "=") of a canonical encoding must be.
_ZERO_LOW4: Final = frozenset("AQgw")
_ZERO_LOW2: Final = frozenset("AEIMQUYcgkosw048")


def canonical_b64(text: str) -> bytes | None:
    """text decoded when it is the canonical strict base64 of its bytes, else None.

    strict_mode still lets excess padding ("QUJD====") and non-zero trailing bits through; the
    length and the unused bits of the last character are checked here (cheaper than encoding
    the result again and comparing), so one value has exactly one spelling on the wire.
    """
    try:
        data = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    n = len(text)
    if n != (len(data) + 2) // 3 * 4:
        return None
    if n and text[-1] == "=":
        if text[-2] == "=":
            if text[-3] not in _ZERO_LOW4:
                return None
        elif text[-2] not in _ZERO_LOW2:
            return None
    return data


def b64d(text: object, where: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("BAD_REQUEST", f"{where}: expected a base64 string")
    data = canonical_b64(text)
    if data is None:
        raise ProtocolError("BAD_BASE64", f"{where}: malformed or non-canonical base64")
    return data


def encode_attrs(attrs: Attrs) -> dict[str, Any]:
    by_name = _attributes()
    out: dict[str, Any] = {}
    for name, value in attrs.items():
        a = by_name[name]
        if a.kind == BYTES:
            out[name] = b64e(value)  # type: ignore[arg-type]
        elif a.kind == ULONGS:
            out[name] = list(value)  # type: ignore[arg-type]
        else:
            out[name] = value
    return out


def decode_attrs(obj: object, where: str = "attrs") -> Attrs:
    if not isinstance(obj, dict):
        raise ProtocolError("BAD_REQUEST", f"{where}: expected an object")
    by_name = _attributes()
    out: Attrs = {}
    for name, value in obj.items():
        a = by_name.get(name)
        if a is None:
            raise ProtocolError("ATTRIBUTE_TYPE_INVALID", f"{where}: unknown attribute {name!r}")
        if a.kind == BOOL:
            if not isinstance(value, bool):
                raise ProtocolError("BAD_REQUEST", f"{where}.{name}: expected true or false")
            out[name] = value
        elif a.kind == ULONG:
            if type(value) is not int or not 0 <= value <= 0xFFFFFFFFFFFFFFFF:
                raise ProtocolError("BAD_REQUEST", f"{where}.{name}: expected an unsigned integer")
            out[name] = value
        elif a.kind == ULONGS:
            if not isinstance(value, list) or not all(
                type(v) is int and 0 <= v <= 0xFFFFFFFFFFFFFFFF for v in value
            ):
                raise ProtocolError("BAD_REQUEST", f"{where}.{name}: expected unsigned integers")
            out[name] = tuple(value)
        else:
            out[name] = b64d(value, f"{where}.{name}")
    return out


def _check(kind: str, value: object, where: str) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise ProtocolError("BAD_REQUEST", f"{where}: expected a string")
        return value
    if kind == "bytes":
        return b64d(value, where)
    if kind == "int":
        if type(value) is not int or not 0 <= value <= 0xFFFFFFFFFFFFFFFF:
            raise ProtocolError("BAD_REQUEST", f"{where}: expected an unsigned integer")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ProtocolError("BAD_REQUEST", f"{where}: expected true or false")
        return value
    if kind == "attrs":
        return decode_attrs(value, where)
    if kind == "object":
        if not isinstance(value, dict):
            raise ProtocolError("BAD_REQUEST", f"{where}: expected a JSON object")
        return value
    if kind.startswith("list:"):
        if not isinstance(value, list):
            raise ProtocolError("BAD_REQUEST", f"{where}: expected a list")
        sub = STRUCTS[kind[5:]]
        return [decode(sub, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return decode(STRUCTS[kind], value, where)


_LEN_CODES: Final = {"passphrase": "PASSPHRASE_LEN_RANGE", "name": "INVALID_NAME"}


def decode(struct: Struct, obj: object, where: str = "body") -> dict[str, Any]:
    """Validate a parsed JSON value against a structure; bytes fields come back as bytes."""
    if not isinstance(obj, dict):
        raise ProtocolError("BAD_REQUEST", f"{where}: expected a JSON object")
    out: dict[str, Any] = {}
    for name, value in obj.items():
        f = struct.by_name.get(name)
        if f is None:
            raise ProtocolError("UNKNOWN_FIELD", f"{where}: unknown field {name!r}")
        kind = f.kind
        # Hot path (every crypto request): well-formed strings skip building the error location.
        if kind == "str" and type(value) is str:
            v: Any = value
        else:
            v = _check(kind, value, f"{where}.{name}")
        if f.max_len and len(v) > f.max_len:
            code = _LEN_CODES.get(name, "BAD_REQUEST")
            raise ProtocolError(code, f"{where}.{name}: longer than {f.max_len}")
        out[name] = v
    for f in struct.fields:
        if f.required and f.name not in out:
            raise ProtocolError("BAD_REQUEST", f"{where}: missing field {f.name!r}")
    return out


def _enc(kind: str, value: Any) -> Any:
    if kind == "bytes":
        return b64e(value)
    if kind == "attrs":
        return encode_attrs(value)
    if kind.startswith("list:"):
        sub = STRUCTS[kind[5:]]
        return [encode(sub, v) for v in value]
    if kind in STRUCTS:
        return encode(STRUCTS[kind], value)
    return value


def encode(struct: Struct, values: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready form of a structure (bytes to base64); unknown keys are a bug."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        out[name] = _enc(struct.by_name[name].kind, value)
    return out
