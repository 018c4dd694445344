"""The one source of the PKCS#11 C ABI (v2.40 and 3.0): its types, structures, callbacks and
functions, as table rows written once.

tools/gen_native.py generates from these rows the C header include/pkcs11ws_ck.h (types and
structures) and include/pkcs11ws_funcs.h (function lists), the Cython declarations
pkcs11ws/_native/ck.pxd and ck_gen.pxd, the module's stubs and the loader's trampolines, and the
one ctypes binding pkcs11ws/abi_ctypes.py that the utilities (pkcs11ws/cli/ckabi.py) and the
tests (tests/support/p11ctypes.py) import. Adding a structure is one row in STRUCTS; a function,
one row in FUNCTIONS_*. Edit the rows here, then run `python tools/gen_native.py`
(tests/unit/test_module_generated.py fails while a generated file is stale).

Layout follows the standard's Unix conventions: natural alignment, no packing, CK_ULONG is
`unsigned long` (64 bits on LP64).
"""

from __future__ import annotations

import re
from typing import Final

from pkcs11ws._lite import dataclass

# One row per scalar type: "NAME = C type". Every type also gets a NAME_PTR; CK_VOID_PTR is
# `void *` and has a CK_VOID_PTR_PTR.
TYPES = """
CK_BYTE = unsigned char
CK_CHAR = CK_BYTE
CK_UTF8CHAR = CK_BYTE
CK_BBOOL = CK_BYTE
CK_ULONG = unsigned long
CK_LONG = long
CK_FLAGS = CK_ULONG
CK_RV = CK_ULONG
CK_SLOT_ID = CK_ULONG
CK_SESSION_HANDLE = CK_ULONG
CK_OBJECT_HANDLE = CK_ULONG
CK_OBJECT_CLASS = CK_ULONG
CK_KEY_TYPE = CK_ULONG
CK_CERTIFICATE_TYPE = CK_ULONG
CK_ATTRIBUTE_TYPE = CK_ULONG
CK_MECHANISM_TYPE = CK_ULONG
CK_USER_TYPE = CK_ULONG
CK_STATE = CK_ULONG
CK_NOTIFICATION = CK_ULONG
CK_MAC_GENERAL_PARAMS = CK_ULONG
CK_RSA_PKCS_MGF_TYPE = CK_ULONG
CK_RSA_PKCS_OAEP_SOURCE_TYPE = CK_ULONG
CK_EC_KDF_TYPE = CK_ULONG
"""

# One row per callback type the application hands to the module: "NAME(params)".
CALLBACKS = """
CK_NOTIFY(CK_SESSION_HANDLE hSession, CK_NOTIFICATION event, CK_VOID_PTR pApplication)
CK_CREATEMUTEX(CK_VOID_PTR_PTR ppMutex)
CK_DESTROYMUTEX(CK_VOID_PTR pMutex)
CK_LOCKMUTEX(CK_VOID_PTR pMutex)
CK_UNLOCKMUTEX(CK_VOID_PTR pMutex)
"""

# One row per structure, fields in the standard's order: "NAME(type field, type field[n], ...)".
# A row may use the types above, the callbacks and the structures of earlier rows. Every
# structure also gets NAME_PTR and NAME_PTR_PTR. In the ctypes binding a CK_CHAR_PTR field is a
# NUL-terminated string (c_char_p); every other pointer is a c_void_p. CK_INTERFACE (3.0) names a
# versioned function list: pFunctionList points at a CK_FUNCTION_LIST (2.x) or a
# CK_FUNCTION_LIST_3_0, both starting with their CK_VERSION. The mechanism parameters at the end
# (PSS, OAEP, GCM, ECDH1) are there for the asymmetric and AEAD mechanisms.
STRUCTS = """
CK_VERSION(CK_BYTE major, CK_BYTE minor)
CK_INFO(CK_VERSION cryptokiVersion, CK_UTF8CHAR manufacturerID[32], CK_FLAGS flags, \
CK_UTF8CHAR libraryDescription[32], CK_VERSION libraryVersion)
CK_SLOT_INFO(CK_UTF8CHAR slotDescription[64], CK_UTF8CHAR manufacturerID[32], CK_FLAGS flags, \
CK_VERSION hardwareVersion, CK_VERSION firmwareVersion)
CK_TOKEN_INFO(CK_UTF8CHAR label[32], CK_UTF8CHAR manufacturerID[32], CK_UTF8CHAR model[16], \
CK_CHAR serialNumber[16], CK_FLAGS flags, CK_ULONG ulMaxSessionCount, CK_ULONG ulSessionCount, \
CK_ULONG ulMaxRwSessionCount, CK_ULONG ulRwSessionCount, CK_ULONG ulMaxPinLen, \
CK_ULONG ulMinPinLen, CK_ULONG ulTotalPublicMemory, CK_ULONG ulFreePublicMemory, \
CK_ULONG ulTotalPrivateMemory, CK_ULONG ulFreePrivateMemory, CK_VERSION hardwareVersion, \
CK_VERSION firmwareVersion, CK_CHAR utcTime[16])
CK_SESSION_INFO(CK_SLOT_ID slotID, CK_STATE state, CK_FLAGS flags, CK_ULONG ulDeviceError)
CK_ATTRIBUTE(CK_ATTRIBUTE_TYPE type, CK_VOID_PTR pValue, CK_ULONG ulValueLen)
CK_MECHANISM(CK_MECHANISM_TYPE mechanism, CK_VOID_PTR pParameter, CK_ULONG ulParameterLen)
CK_MECHANISM_INFO(CK_ULONG ulMinKeySize, CK_ULONG ulMaxKeySize, CK_FLAGS flags)
CK_C_INITIALIZE_ARGS(CK_CREATEMUTEX CreateMutex, CK_DESTROYMUTEX DestroyMutex, \
CK_LOCKMUTEX LockMutex, CK_UNLOCKMUTEX UnlockMutex, CK_FLAGS flags, CK_VOID_PTR pReserved)
CK_INTERFACE(CK_CHAR_PTR pInterfaceName, CK_VOID_PTR pFunctionList, CK_FLAGS flags)
CK_RSA_PKCS_PSS_PARAMS(CK_MECHANISM_TYPE hashAlg, CK_RSA_PKCS_MGF_TYPE mgf, CK_ULONG sLen)
CK_RSA_PKCS_OAEP_PARAMS(CK_MECHANISM_TYPE hashAlg, CK_RSA_PKCS_MGF_TYPE mgf, \
CK_RSA_PKCS_OAEP_SOURCE_TYPE source, CK_VOID_PTR pSourceData, CK_ULONG ulSourceDataLen)
CK_GCM_PARAMS(CK_BYTE_PTR pIv, CK_ULONG ulIvLen, CK_ULONG ulIvBits, CK_BYTE_PTR pAAD, \
CK_ULONG ulAADLen, CK_ULONG ulTagBits)
CK_ECDH1_DERIVE_PARAMS(CK_EC_KDF_TYPE kdf, CK_ULONG ulSharedDataLen, CK_BYTE_PTR pSharedData, \
CK_ULONG ulPublicDataLen, CK_BYTE_PTR pPublicData)
"""

# One row per function, in the order of the standard's function lists. After "=": "core" when
# pkcs11ws/_native implements it (as f_<Name>), else the CKR the generated stub returns once the
# library is initialised.
FUNCTIONS_240 = """
C_Initialize(CK_VOID_PTR pInitArgs) = core
C_Finalize(CK_VOID_PTR pReserved) = core
C_GetInfo(CK_INFO_PTR pInfo) = core
C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList) = core
C_GetSlotList(CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList, CK_ULONG_PTR pulCount) = core
C_GetSlotInfo(CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo) = core
C_GetTokenInfo(CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo) = core
C_GetMechanismList(CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList, \
CK_ULONG_PTR pulCount) = core
C_GetMechanismInfo(CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR pInfo) = core
C_InitToken(CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen, CK_UTF8CHAR_PTR pLabel) \
= CKR_FUNCTION_NOT_SUPPORTED
C_InitPIN(CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen) \
= CKR_FUNCTION_NOT_SUPPORTED
C_SetPIN(CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pOldPin, CK_ULONG ulOldLen, \
CK_UTF8CHAR_PTR pNewPin, CK_ULONG ulNewLen) = CKR_FUNCTION_NOT_SUPPORTED
C_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication, CK_NOTIFY Notify, \
CK_SESSION_HANDLE_PTR phSession) = core
C_CloseSession(CK_SESSION_HANDLE hSession) = core
C_CloseAllSessions(CK_SLOT_ID slotID) = core
C_GetSessionInfo(CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo) = core
C_GetOperationState(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, \
CK_ULONG_PTR pulOperationStateLen) = CKR_FUNCTION_NOT_SUPPORTED
C_SetOperationState(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, \
CK_ULONG ulOperationStateLen, CK_OBJECT_HANDLE hEncryptionKey, \
CK_OBJECT_HANDLE hAuthenticationKey) = CKR_FUNCTION_NOT_SUPPORTED
C_Login(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, \
CK_ULONG ulPinLen) = core
C_Logout(CK_SESSION_HANDLE hSession) = core
C_CreateObject(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount, \
CK_OBJECT_HANDLE_PTR phObject) = core
C_CopyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate, \
CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phNewObject) = core
C_DestroyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject) = core
C_GetObjectSize(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ULONG_PTR pulSize) \
= core
C_GetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, \
CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount) = core
C_SetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, \
CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount) = core
C_FindObjectsInit(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount) = core
C_FindObjects(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject, \
CK_ULONG ulMaxObjectCount, CK_ULONG_PTR pulObjectCount) = core
C_FindObjectsFinal(CK_SESSION_HANDLE hSession) = core
C_EncryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) \
= core
C_Encrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
CK_BYTE_PTR pEncryptedData, CK_ULONG_PTR pulEncryptedDataLen) = core
C_EncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen, \
CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen) = core
C_EncryptFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastEncryptedPart, \
CK_ULONG_PTR pulLastEncryptedPartLen) = core
C_DecryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) \
= core
C_Decrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedData, CK_ULONG ulEncryptedDataLen, \
CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen) = core
C_DecryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, \
CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen) \
= core
C_DecryptFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastPart, CK_ULONG_PTR pulLastPartLen) \
= core
C_DigestInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism) \
= core
C_Digest(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen) = core
C_DigestUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen) \
= core
C_DigestKey(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey) = core
C_DigestFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen) \
= core
C_SignInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) = core
C_Sign(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen) = core
C_SignUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen) \
= core
C_SignFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen) \
= core
C_SignRecoverInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
CK_OBJECT_HANDLE hKey) = CKR_FUNCTION_NOT_SUPPORTED
C_SignRecover(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen) = CKR_FUNCTION_NOT_SUPPORTED
C_VerifyInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) \
= core
C_Verify(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen) = core
C_VerifyUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen) \
= core
C_VerifyFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen) \
= core
C_VerifyRecoverInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
CK_OBJECT_HANDLE hKey) = CKR_FUNCTION_NOT_SUPPORTED
C_VerifyRecover(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen, \
CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen) = CKR_FUNCTION_NOT_SUPPORTED
C_DigestEncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen, \
CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen) = CKR_FUNCTION_NOT_SUPPORTED
C_DecryptDigestUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, \
CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen) \
= CKR_FUNCTION_NOT_SUPPORTED
C_SignEncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen, \
CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen) = CKR_FUNCTION_NOT_SUPPORTED
C_DecryptVerifyUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, \
CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen) \
= CKR_FUNCTION_NOT_SUPPORTED
C_GenerateKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phKey) = core
C_GenerateKeyPair(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
CK_ATTRIBUTE_PTR pPublicKeyTemplate, CK_ULONG ulPublicKeyAttributeCount, \
CK_ATTRIBUTE_PTR pPrivateKeyTemplate, CK_ULONG ulPrivateKeyAttributeCount, \
CK_OBJECT_HANDLE_PTR phPublicKey, CK_OBJECT_HANDLE_PTR phPrivateKey) = core
C_WrapKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
CK_OBJECT_HANDLE hWrappingKey, CK_OBJECT_HANDLE hKey, CK_BYTE_PTR pWrappedKey, \
CK_ULONG_PTR pulWrappedKeyLen) = CKR_FUNCTION_NOT_SUPPORTED
C_UnwrapKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
CK_OBJECT_HANDLE hUnwrappingKey, CK_BYTE_PTR pWrappedKey, CK_ULONG ulWrappedKeyLen, \
CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey) \
= CKR_FUNCTION_NOT_SUPPORTED
C_DeriveKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
CK_OBJECT_HANDLE hBaseKey, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulAttributeCount, \
CK_OBJECT_HANDLE_PTR phKey) = CKR_FUNCTION_NOT_SUPPORTED
C_SeedRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSeed, CK_ULONG ulSeedLen) \
= CKR_RANDOM_SEED_NOT_SUPPORTED
C_GenerateRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData, CK_ULONG ulRandomLen) = core
C_GetFunctionStatus(CK_SESSION_HANDLE hSession) = CKR_FUNCTION_NOT_PARALLEL
C_CancelFunction(CK_SESSION_HANDLE hSession) = CKR_FUNCTION_NOT_PARALLEL
C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pReserved) \
= CKR_FUNCTION_NOT_SUPPORTED
"""

FUNCTIONS_30 = """
C_GetInterfaceList(CK_INTERFACE_PTR pInterfacesList, CK_ULONG_PTR pulCount) = core
C_GetInterface(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION_PTR pVersion, \
CK_INTERFACE_PTR_PTR ppInterface, CK_FLAGS flags) = core
C_LoginUser(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, \
CK_ULONG ulPinLen, CK_UTF8CHAR_PTR pUsername, CK_ULONG ulUsernameLen) = core
C_SessionCancel(CK_SESSION_HANDLE hSession, CK_FLAGS flags) = core
C_MessageEncryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
CK_OBJECT_HANDLE hKey) = CKR_FUNCTION_NOT_SUPPORTED
C_EncryptMessage(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, CK_ULONG ulParameterLen, \
CK_BYTE_PTR pAssociatedData, CK_ULONG ulAssociatedDataLen, CK_BYTE_PTR pPlaintext, \
CK_ULONG ulPlaintextLen, CK_BYTE_PTR pCiphertext, CK_ULONG_PTR pulCiphertextLen) \
= CKR_FUNCTION_NOT_SUPPORTED
C_EncryptMessageBegin(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData, CK_ULONG ulAssociatedDataLen) \
= CKR_FUNCTION_NOT_SUPPORTED
C_EncryptMessageNext(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
CK_ULONG ulParameterLen, CK_BYTE_PTR pPlaintextPart, CK_ULONG ulPlaintextPartLen, \
CK_BYTE_PTR pCiphertextPart, CK_ULONG_PTR pulCiphertextPartLen, CK_FLAGS flags) \
= CKR_FUNCTION_NOT_SUPPORTED
C_MessageEncryptFinal(CK_SESSION_HANDLE hSession) = CKR_FUNCTION_NOT_SUPPORTED
C_MessageDecryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
CK_OBJECT_HANDLE hKey) = CKR_FUNCTION_NOT_SUPPORTED
C_DecryptMessage(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, CK_ULONG ulParameterLen, \
CK_BYTE_PTR pAssociatedData, CK_ULONG ulAssociatedDataLen, CK_BYTE_PTR pCiphertext, \
CK_ULONG ulCiphertextLen, CK_BYTE_PTR pPlaintext, CK_ULONG_PTR pulPlaintextLen) \
= CKR_FUNCTION_NOT_SUPPORTED
C_DecryptMessageBegin(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData, CK_ULONG ulAssociatedDataLen) \
= CKR_FUNCTION_NOT_SUPPORTED
C_DecryptMessageNext(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
CK_ULONG ulParameterLen, CK_BYTE_PTR pCiphertextPart, CK_ULONG ulCiphertextPartLen, \
CK_BYTE_PTR pPlaintextPart, CK_ULONG_PTR pulPlaintextPartLen, CK_FLAGS flags) \
= CKR_FUNCTION_NOT_SUPPORTED
C_MessageDecryptFinal(CK_SESSION_HANDLE hSession) = CKR_FUNCTION_NOT_SUPPORTED
C_MessageSignInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
CK_OBJECT_HANDLE hKey) = CKR_FUNCTION_NOT_SUPPORTED
C_SignMessage(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, CK_ULONG ulParameterLen, \
CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen) \
= CKR_FUNCTION_NOT_SUPPORTED
C_SignMessageBegin(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
CK_ULONG ulParameterLen) = CKR_FUNCTION_NOT_SUPPORTED
C_SignMessageNext(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, CK_ULONG ulParameterLen, \
CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen) \
= CKR_FUNCTION_NOT_SUPPORTED
C_MessageSignFinal(CK_SESSION_HANDLE hSession) = CKR_FUNCTION_NOT_SUPPORTED
C_MessageVerifyInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
CK_OBJECT_HANDLE hKey) = CKR_FUNCTION_NOT_SUPPORTED
C_VerifyMessage(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, CK_ULONG ulParameterLen, \
CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen) \
= CKR_FUNCTION_NOT_SUPPORTED
C_VerifyMessageBegin(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
CK_ULONG ulParameterLen) = CKR_FUNCTION_NOT_SUPPORTED
C_VerifyMessageNext(CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature, \
CK_ULONG ulSignatureLen) = CKR_FUNCTION_NOT_SUPPORTED
C_MessageVerifyFinal(CK_SESSION_HANDLE hSession) = CKR_FUNCTION_NOT_SUPPORTED
"""

_ROW: Final = re.compile(r"^(C_\w+)\((.*)\)\s*=\s*(\w+)$")
_DECL: Final = re.compile(r"^(CK_\w+)\((.*)\)$")
_TYPE: Final = re.compile(r"^(CK_\w+)\s*=\s*(\w[\w ]*)$")
_FIELD: Final = re.compile(r"^(\w+)\s+(\w+)(?:\[(\d+)\])?$")


@dataclass(frozen=True)
class Func:
    """One function: its name, its (C type, parameter name) pairs and who implements it."""

    name: str
    params: tuple[tuple[str, str], ...]
    impl: str

    @property
    def short(self) -> str:
        return self.name[2:]

    def c_params(self) -> str:
        return ", ".join(f"{t} {n}" for t, n in self.params)

    def c_types(self) -> str:
        return ", ".join(t for t, _ in self.params)

    def c_args(self) -> str:
        return ", ".join(n for _, n in self.params)


@dataclass(frozen=True)
class Field:
    """One member of a structure: its C type, its name and, for an array, its length."""

    ctype: str
    name: str
    length: int | None = None

    def c_decl(self) -> str:
        return f"{self.ctype} {self.name}" + (f"[{self.length}]" if self.length else "")


@dataclass(frozen=True)
class Struct:
    """One structure: its name and its fields in order."""

    name: str
    fields: tuple[Field, ...]


def _rows(table: str) -> list[str]:
    return [line.strip() for line in table.replace("\\\n", "").strip().splitlines()]


def _params(text: str, row: str) -> tuple[tuple[str, str], ...]:
    params = []
    for p in text.split(","):
        ctype, _, pname = p.strip().rpartition(" ")
        if not ctype or not pname:
            raise ValueError(f"bad parameter {p!r} in row {row!r}")
        params.append((ctype, pname))
    return tuple(params)


def parse(table: str) -> list[Func]:
    """The rows of a function table string; ValueError on a row that does not parse."""
    out = []
    for line in _rows(table):
        m = _ROW.match(line)
        if m is None:
            raise ValueError(f"bad function row: {line!r}")
        out.append(Func(m.group(1), _params(m.group(2), line), m.group(3)))
    return out


def parse_types(table: str) -> list[tuple[str, str]]:
    """(name, C type) per row of TYPES; ValueError on a row that does not parse."""
    out = []
    for line in _rows(table):
        m = _TYPE.match(line)
        if m is None:
            raise ValueError(f"bad type row: {line!r}")
        out.append((m.group(1), m.group(2)))
    return out


def parse_callbacks(table: str) -> list[Func]:
    """The rows of CALLBACKS, as functions (impl empty)."""
    out = []
    for line in _rows(table):
        m = _DECL.match(line)
        if m is None:
            raise ValueError(f"bad callback row: {line!r}")
        out.append(Func(m.group(1), _params(m.group(2), line), ""))
    return out


def parse_structs(table: str) -> list[Struct]:
    """The rows of STRUCTS; ValueError on a row that does not parse."""
    out = []
    for line in _rows(table):
        m = _DECL.match(line)
        if m is None:
            raise ValueError(f"bad struct row: {line!r}")
        fields = []
        for f in m.group(2).split(","):
            fm = _FIELD.match(f.strip())
            if fm is None:
                raise ValueError(f"bad field {f!r} in row {line!r}")
            fields.append(
                Field(fm.group(1), fm.group(2), int(fm.group(3)) if fm.group(3) else None)
            )
        out.append(Struct(m.group(1), tuple(fields)))
    return out


TYPEDEFS: Final = parse_types(TYPES)
CALLBACK_TYPES: Final = parse_callbacks(CALLBACKS)
STRUCT_TYPES: Final = parse_structs(STRUCTS)
V240: Final = parse(FUNCTIONS_240)
V30: Final = parse(FUNCTIONS_30)
ALL: Final = V240 + V30
assert len(V240) == 68 and len(V30) == 24
