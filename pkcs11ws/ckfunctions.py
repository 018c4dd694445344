"""The one table of PKCS#11 functions (v2.40 and 3.0), in the order of the standard's lists.

tools/gen_native.py generates the module's C and Cython glue from it (the CK_FUNCTION_LIST
structs, the stubs, the loader's trampolines); pkcs11ws/tools/ckabi.py and tests/p11ctypes.py
build their ctypes CK_FUNCTION_LIST from it, so every binding agrees on the field order.
Edit the rows here, then run `python tools/gen_native.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

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
= CKR_FUNCTION_NOT_SUPPORTED
C_Digest(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen) = CKR_FUNCTION_NOT_SUPPORTED
C_DigestUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen) \
= CKR_FUNCTION_NOT_SUPPORTED
C_DigestKey(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey) = CKR_FUNCTION_NOT_SUPPORTED
C_DigestFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen) \
= CKR_FUNCTION_NOT_SUPPORTED
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
CK_OBJECT_HANDLE_PTR phPublicKey, CK_OBJECT_HANDLE_PTR phPrivateKey) = CKR_FUNCTION_NOT_SUPPORTED
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


def parse(table: str) -> list[Func]:
    """The rows of a table string; ValueError on a row that does not parse."""
    out = []
    for line in table.replace("\\\n", "").strip().splitlines():
        m = _ROW.match(line.strip())
        if m is None:
            raise ValueError(f"bad function row: {line!r}")
        params = []
        for p in m.group(2).split(","):
            ctype, _, pname = p.strip().rpartition(" ")
            if not ctype or not pname:
                raise ValueError(f"bad parameter {p!r} in row {line!r}")
            params.append((ctype, pname))
        out.append(Func(m.group(1), tuple(params), m.group(3)))
    return out


V240: Final = parse(FUNCTIONS_240)
V30: Final = parse(FUNCTIONS_30)
ALL: Final = V240 + V30
assert len(V240) == 68 and len(V30) == 24
