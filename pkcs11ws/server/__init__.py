"""The key service ("Web Services server"): a plain ASGI app on uvicorn over mutual TLS.

Modules: cli (the pkcs11ws-server command), pki (init: development PKI and config files),
settings (server.yaml), store / sqlite_store (the storage interface and its SQLite backend),
sealing (master-key and passphrase cryptography), objects (template rules), ops (AES-CBC, HMAC),
app (routing, idempotency, handlers).
"""
