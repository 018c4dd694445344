"""Fixtures shared by several layers: the real key service, PostgreSQL, the stdlib HTTPS client
and the built module. Each layer's own conftest.py holds what only its files share; the helper
code behind these fixtures lives in tests/support/ (imported as `tests.support.<name>`).

`service` (session scope): `pkcs11ws-server init` into a temporary folder with a free port and
cheap scrypt parameters, then `serve`, waiting for /health; stopped by PID (SIGTERM, then
SIGKILL if stuck) at the end. It has the attributes
    dir, port, url, client_cfg, ca, cert, key, server_yaml, pid
(plus log: the server's stdout/stderr file, and proc: its Popen).

`fresh_service` (function scope): a factory `fresh_service(workers=1, overrides=None,
prepare=None, directory=None, store=None)` for a test that needs its own service (overrides:
server.yaml keys to change, nested dicts merged one level; prepare(dir): called before serve;
directory: serve a folder made before again, on a new port; store: a store URL for init);
every service it made is stopped when the test ends.

`own_service` (module scope): a key service for one test file alone, for consumers that see only
the first few dozen slots (GnuTLS, p11-kit, the bench's C host take 48 or 64): on the shared
`service` the softcards of every test before them pile up, so the order of the files would decide.

`postgres` (session scope): a real PostgreSQL 15 cluster (tests/support/pg_util.py) on a free
port in a temporary folder, stopped at the end; `postgres.new_database()` gives the URL of an
empty database. `start_service(..., store=URL)` runs a service on it.

`api` (function scope): an `Api` on `service`; `make_api(svc, cert=None, key=None)`: a factory
of `Api`s on any service (another identity), all closed at the end.

`mod` (module scope): the built module (tests/support/p11ctypes.Module) initialised on the
shared `service`, finalised at the end of the file.
`bare_mod` (function scope): the built module, finalised and with no PKCS11WS_* variable in the
environment; the test initialises it with its own configuration (and may finalise it).
`logged_card` (function scope): a fresh softcard seen through `mod`:
(slot, logged-in read-write session, passphrase bytes); its sessions closed at the end.

`pytest_collection_modifyitems` marks every test with its layer (the folder under tests/), so
`pytest -m unit` (or service, module, consumers, cli) selects one layer. (A hook in any conftest
sees every collected item, so this one marks for all layers.) The summary ends with the random
order's seed (pytest-randomly).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pkcs11ws import constants as C
from pkcs11ws.__main__ import module_path
from tests.support.cards import client_card
from tests.support.p11ctypes import Module
from tests.support.service import Api, Service, start_service

LAYERS = ("unit", "service", "module", "consumers", "cli")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.path)).resolve().relative_to(TESTS).parts
        if parts and parts[0] in LAYERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    # pytest-randomly prints its seed in the header, which -q (make test, CI) leaves out.
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"random order: replay with -p randomly --randomly-seed={seed}")


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("service"))
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def own_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("own-service"))
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    from tests.support.pg_util import PgServer

    server = PgServer()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def fresh_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    made: list[Service] = []

    def make(
        workers: int = 1,
        overrides: dict[str, Any] | None = None,
        prepare: Callable[[Path], None] | None = None,
        directory: Path | None = None,
        store: str | None = None,
    ) -> Service:
        """directory: restart a service on a folder made before (no init); store: a store URL
        for init."""
        if directory is not None:
            svc = start_service(directory, workers, overrides, prepare, init=False)
        else:
            mk = tmp_path_factory.mktemp("fresh")
            svc = start_service(mk, workers, overrides, prepare, store=store)
        made.append(svc)
        return svc

    try:
        yield make
    finally:
        for svc in made:
            svc.stop()


@pytest.fixture
def api(service: Service) -> Iterator[Api]:
    client = Api(service)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def make_api() -> Iterator[Any]:
    made: list[Api] = []

    def make(svc: Service, cert: Path | None = None, key: Path | None = None) -> Api:
        client = Api(svc, cert, key)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.close()


@pytest.fixture
def bare_mod(monkeypatch: pytest.MonkeyPatch) -> Iterator[Module]:
    for var in list(os.environ):
        if var.startswith("PKCS11WS_"):
            monkeypatch.delenv(var)
    m = Module(module_path())
    m.call("C_Finalize", None)
    yield m
    m.call("C_Finalize", None)


@pytest.fixture(scope="module")
def mod(service: Service) -> Iterator[Module]:
    m = Module(module_path())
    rv = m.initialize(str(service.client_cfg))
    assert rv in (C.CKR_OK, C.CKR_CRYPTOKI_ALREADY_INITIALIZED)
    yield m
    m.call("C_Finalize", None)


@pytest.fixture
def logged_card(mod: Module, service: Service) -> Iterator[tuple[int, int, bytes]]:
    name, text = client_card(service.client_cfg, "o")
    pin = text.encode()
    slot = mod.slot_by_label(name)
    h = mod.open(slot)
    assert mod.login(h, pin) == C.CKR_OK
    yield slot, h, pin
    mod.call("C_CloseAllSessions", slot)
