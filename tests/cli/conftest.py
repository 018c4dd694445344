"""The cli layer: what an operator runs: the utilities (ck*, softcardtool, install; helpers in
tests/support/tools_util.py), the server's command line and systemd unit, the packaging (sdist,
wheel), `make demo`, the documentation's snippets and references, the bench harness smoke test.

`hsm` (module scope): a SoftHSM2 token (tests/support/tools_util.make_softhsm) in a temporary
folder, for the utilities that are pointed at another PKCS#11 module.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.tools_util import make_softhsm


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_softhsm(tmp_path_factory.mktemp("softhsm"))
