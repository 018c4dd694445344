"""The module layer: the client side of the product against a real key service: the built
libpkcs11ws.so driven through ctypes (tests/support/p11ctypes.py) or small C hosts
(tests/module/c/), and its pycurl client (pkcs11ws.client, the test_client_* files) which the
module uses to reach the service.

`client` (module scope): a KeyServiceClient on the shared `service`, closed at the end.
`restarted` (function scope): a list of services the test started again by hand, stopped at
the end.
The `mod`, `bare_mod` and `logged_card` fixtures come from tests/conftest.py (the consumers and
service layers use them too).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config
from tests.support.service import Service


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[KeyServiceClient]:
    c = KeyServiceClient(load_config(str(service.client_cfg)))
    yield c
    c.close()


@pytest.fixture
def restarted() -> Iterator[list[Service]]:
    """A list the test appends the services it restarts itself to; each is stopped at the end."""
    made: list[Service] = []
    yield made
    for svc in made:
        svc.stop()
