"""The consumers layer: real third-party PKCS#11 consumers loading the built module against a
real key service: OpenSSL (pkcs11-provider), GnuTLS, p11-kit, OpenSC pkcs11-tool, Java SunPKCS11
(tests/consumers/java/), python-pkcs11 and PyKCS11; the drop-in snippets of README.md
(tests/support/dropin_util.py reads them).

No fixtures of its own yet: a fixture two consumer files share goes here, once.
"""
