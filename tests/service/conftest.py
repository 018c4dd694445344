"""The service layer: the key service driven over real mutual TLS as a client would (the stdlib
`api` / `make_api` of tests/support/service.py, curl, raw TLS sockets), without the PKCS#11
module: endpoints, authorization, lockout, caches, master key, backup, replicas and the stores
behind a running service (PostgreSQL restart and failover).

`card` (function scope): a fresh softcard on the shared `service`, activated: (id, token).
`shared_card` (module scope): one softcard for a whole test file, with the Api that made it:
(api, id, token); for files whose module-scoped fixtures build on it (key pairs made once).
`people` (module scope): {"alice": Who, "bob": Who}, two identities of their own on the shared
`service`, each with a logged-in softcard (tests/support/people.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.people import Who
from tests.support.service import Api, Service, issue_client


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


@pytest.fixture(scope="module")
def people(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Who]]:
    made: dict[str, Who] = {}
    try:
        for role in ("alice", "bob"):
            name = f"{role}-{uuid.uuid4().hex[:8]}"
            d = issue_client(service, name, tmp_path_factory.mktemp(role))
            made[role] = Who(Api(service, d / "client.pem", d / "client.key"), name)
        yield made
    finally:
        for w in made.values():
            w.api.close()
