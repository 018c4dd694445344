"""Two identities, each with a logged-in softcard holding an HMAC and an AES key: what the
service tests of the body token and of the single-request short cuts attack each other with
(the `people` fixture of tests/service/conftest.py)."""

from __future__ import annotations

from tests.support.service import Api

PASS = b"token body passphrase"
HMAC_VALUE = bytes(range(32))
AES_VALUE = bytes(range(16))


class Who:
    """An identity with a softcard holding an HMAC and an AES key, logged in."""

    def __init__(self, api: Api, name: str) -> None:
        self.api = api
        self.name = name
        self.card, self.token = api.new_card(PASS)
        self.mac = api.import_key(self.card, self.token, 0x2B, HMAC_VALUE)
        self.aes = api.import_key(self.card, self.token, 0x1F, AES_VALUE)
