"""A softcard made through the module's own client (pkcs11ws.client) on a real service: what
the module and consumer tests log in to. (The service tests make theirs with `Api.new_card`, the
utilities' tests with tools_util.activated_card: those also activate it over the API.)"""

from __future__ import annotations

import uuid
from pathlib import Path

from pkcs11ws.client.api import KeyServiceClient
from pkcs11ws.config import load_config


def client_card(cfg: Path, prefix: str = "c") -> tuple[str, str]:
    """A new softcard on the service of client config `cfg`: (name, passphrase)."""
    client = KeyServiceClient(load_config(str(cfg)))
    try:
        name = prefix + uuid.uuid4().hex[:12]
        pin = uuid.uuid4().hex
        client.create_softcard(name, pin.encode())
    finally:
        client.close()
    return name, pin
