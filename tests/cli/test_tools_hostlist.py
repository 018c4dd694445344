"""The utilities with several key services in HOST (issue 12 item 4): ckcheckinst checks each
listed server on a line of its own; softcardtool works while one of them is down."""

from __future__ import annotations

from tests.cli.test_tools_ckcheckinst import check, lines
from tests.support.service import free_port
from tests.support.tools_util import service_env, tool


def test_ckcheckinst_checks_every_listed_server(service):
    down = free_port()
    env = service_env(service, PKCS11WS_HOST=f"127.0.0.1:{service.port}, localhost:{down}")
    res = check(env=env)
    got = lines(res.stdout)
    assert f"key service 127.0.0.1:{service.port}, localhost:{down}" in got["configuration"][1]
    first, second = got["key service #1"], got["key service #2"]
    assert first[0] == "OK" and f"https://127.0.0.1:{service.port}" in first[1]
    assert second[0] == "FAILED" and f"https://localhost:{down}" in second[1]
    assert f"nothing accepts connections at localhost:{down}" in second[1]
    assert res.returncode == 1  # a listed server that does not answer is a failed check
    # The module still lists slots through the server that answers.
    assert got["slots and tokens"][0] == "OK", res.stdout


def test_softcardtool_lists_through_the_server_that_answers(service):
    env = service_env(
        service,
        PKCS11WS_HOST=f"localhost:{free_port()},127.0.0.1:{service.port}",
        PKCS11WS_MAXRETRIES="0",
    )
    res = tool("softcardtool", "-l", "-v", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "softcard(s)" in res.stdout
    assert f"https://127.0.0.1:{service.port}" in res.stdout
