"""Cython core of pkcs11ws (grows into the CK_FUNCTION_LIST; see issue 3)."""


def cryptoki_version():
    """The PKCS#11 version this core implements, as (major, minor)."""
    return (2, 40)
