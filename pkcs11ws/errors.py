"""The Python side of the one CKR error funnel.

Everything below the Cython core raises PKCS11Error (or a subclass) carrying the CKR to return.
pkcs11ws._native maps any exception to a CKR in exactly one function: PKCS11Error -> its ckr,
MemoryError -> CKR_HOST_MEMORY, anything else -> CKR_GENERAL_ERROR (and a log line).
"""

from __future__ import annotations

from pkcs11ws import constants as C


class PKCS11Error(Exception):
    """An error with the CKR the module must return for it."""

    def __init__(self, ckr: int, message: str = "") -> None:
        super().__init__(message or C.ckr_name(ckr))
        self.ckr = ckr
        self.message = message or C.ckr_name(ckr)

    def __str__(self) -> str:
        return f"{C.ckr_name(self.ckr)}: {self.message}"


class ServiceError(PKCS11Error):
    """The key service answered with an error (JSON code, HTTP status)."""

    def __init__(self, ckr: int, code: str, http: int, message: str) -> None:
        super().__init__(ckr, message)
        self.code = code
        self.http = http

    def __str__(self) -> str:
        return f"{self.code} (HTTP {self.http}, {C.ckr_name(self.ckr)}): {self.message}"


class TransportError(PKCS11Error):
    """The request did not get an answer (network, TLS, timeout) after every retry."""

    def __init__(self, message: str) -> None:
        super().__init__(C.CKR_DEVICE_ERROR, message)


class Finalizing(PKCS11Error):
    """C_Finalize ran (or runs) while this call waited for the key service: it ends at once."""

    def __init__(self) -> None:
        super().__init__(C.CKR_CRYPTOKI_NOT_INITIALIZED, "C_Finalize ended the call")


class ConfigError(PKCS11Error):
    """The configuration file or an override is invalid: C_Initialize fails with GENERAL_ERROR."""

    def __init__(self, message: str) -> None:
        super().__init__(C.CKR_GENERAL_ERROR, message)


class CertificateRejected(TransportError):
    """The key service refused the client certificate (expired, another CA): a configuration
    error no retry can cure. CKR_GENERAL_ERROR, as for an invalid configuration."""

    def __init__(self, message: str) -> None:
        PKCS11Error.__init__(self, C.CKR_GENERAL_ERROR, message)


class InstallationError(ConfigError, ImportError):
    """The installation cannot work (pycurl is the PyPI wheel, ...): C_Initialize fails with
    GENERAL_ERROR after one line, on stderr and in the log, that gives the exact fix; the
    utilities print that line instead of a traceback. An ImportError too, for code that treats
    a missing piece as one."""
