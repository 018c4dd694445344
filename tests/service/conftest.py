"""The service layer: the key service driven over real mutual TLS as a client would (the stdlib
`api` / `make_api` of tests/support/service.py, curl, raw TLS sockets), without the PKCS#11
module: endpoints, authorization, lockout, caches, master key, backup, replicas and the stores
behind a running service (PostgreSQL restart and failover).

`card` (function scope): a fresh softcard on the shared `service`, activated: (id, token).
`shared_card` (module scope): one softcard for a whole test file, with the Api that made it:
(api, id, token); for files whose module-scoped fixtures build on it (key pairs made once).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.service import Api, Service


@pytest.fixture
def card(api: Api) -> tuple[str, str]:
    return api.new_card()


@pytest.fixture(scope="module")
def shared_card(service: Service) -> Iterator[tuple[Api, str, str]]:
    client = Api(service)
    try:
        card_id, token = client.new_card(b"shared card")
        yield client, card_id, token
    finally:
        client.close()
