"""pkcs11ws: a PKCS#11 provider backed by a remote key service over mutual-TLS HTTPS."""

__version__ = "0.1.0"
