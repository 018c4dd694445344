"""The key service ("Web Services server"): a plain ASGI app on uvicorn over mutual TLS.

Modules: cli (the pkcs11ws-server command), pki (init: development PKI and config files),
settings (server.yaml), store / sqlite_store (the storage interface and its SQLite backend),
sealing (master-key and passphrase cryptography), objects (template rules), ops (AES-CBC, HMAC),
app (routing, idempotency), pipeline (identity, authorization, audit per request), handlers
(the operations), identity (clients file, roles), peer (client certificate into the ASGI scope,
refused handshakes), audit (the audit trail), reload (SIGHUP hooks).
"""
