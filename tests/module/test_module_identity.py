"""The module and the utilities as an issued identity: `issue-client` output works as it is with
softcardtool and pkcs11-tool, which then see only that identity's softcards; a long-running
application keeps working past the activation lifetime (renew-while-in-use); the module's
request ids appear in the service's audit trail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from pkcs11ws.__main__ import module_path
from tests.support.service import Api, Service, b64, issue_client, new_idem

PKCS11_TOOL = shutil.which("pkcs11-tool")
PASS = "erin passphrase 42"


def _env(cfg: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKCS11WS_")}
    return {**env, "PKCS11WS_CONFIG": str(cfg), "PKCS11WS_RETRYDELAY": "0", **extra}


def test_issue_client_files(service: Service, tmp_path: Path) -> None:
    d = issue_client(service, "files-" + uuid.uuid4().hex[:6], tmp_path / "out")
    assert {p.name for p in d.iterdir()} >= {
        "client.pem",
        "client.key",
        "ca.pem",
        "pkcs11webservices.cfg",
    }
    assert (d / "client.key").stat().st_mode & 0o777 == 0o600
    cfg = (d / "pkcs11webservices.cfg").read_text()
    assert f"CERT {d}/client.pem" in cfg and f"AUTH {d}/ca.pem" in cfg
    assert f"PORT {service.port}" in cfg
    # A second identity with a name already taken is refused.
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pkcs11ws.server.cli",
            "issue-client",
            "--config",
            str(service.server_yaml),
            "--name",
            "admin",
            "--out",
            str(tmp_path / "y"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 1 and "exists" in res.stderr


@pytest.mark.skipif(PKCS11_TOOL is None, reason="pkcs11-tool (Debian opensc) is missing")
def test_issued_identity_with_softcardtool_and_pkcs11_tool(service: Service, tmp_path: Path):
    # Someone else's card (the admin's), which erin must not see.
    admin = Api(service)
    other = "adm" + uuid.uuid4().hex[:10]
    admin.ok(
        admin.post(
            "/km/v1/softcards", {"name": other, "passphrase": b64(PASS.encode())}, idem=new_idem()
        )
    )
    admin.close()
    erin = "erin-" + uuid.uuid4().hex[:6]
    d = issue_client(service, erin, tmp_path / "erin")
    env = _env(d / "pkcs11webservices.cfg")
    mine = "erin" + uuid.uuid4().hex[:10]
    tool = [sys.executable, "-m", "pkcs11ws.cli.softcardtool"]
    r = subprocess.run(
        [*tool, "-g", f"--name={mine}"],
        input=f"{PASS}\n{PASS}\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [*tool, "-l"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0 and mine in r.stdout and other not in r.stdout, r.stdout
    assert "1 softcard(s)" in r.stdout
    p11 = [str(PKCS11_TOOL), "--module", module_path()]
    r = subprocess.run(
        [*p11, "-L"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    assert mine in r.stdout and other not in r.stdout, r.stdout
    r = subprocess.run(
        [
            *p11,
            "--token-label",
            mine,
            "--login",
            "--pin",
            "env:P11PIN",
            "--keygen",
            "--key-type",
            "AES:16",
            "--label",
            "erin-key",
            "--private",
            "--sensitive",
        ],
        env={**env, "P11PIN": PASS},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    # The admin sees erin's card and its key.
    admin = Api(service)
    cards = {c["name"]: c for c in admin.ok(admin.get("/km/v1/softcards"))["softcards"]}
    admin.close()
    assert (cards[mine]["keys"], cards[mine]["owner"]) == (1, erin)


_LONG_RUN = textwrap.dedent(
    """
    import os, sys, time, pkcs11
    from pkcs11 import KeyType, MechanismFlag
    lib = pkcs11.lib(sys.argv[1])
    token = lib.get_token(token_label=sys.argv[2])
    done = 0
    with token.open(rw=True, user_pin=os.environ["P11PIN"]) as s:
        key = s.generate_key(KeyType.AES, 128, label="long", store=True,
                             capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT)
        iv = bytes(16)
        end = time.monotonic() + float(sys.argv[3])
        while time.monotonic() < end:
            ct = key.encrypt(b"still here", mechanism_param=iv)
            assert key.decrypt(ct, mechanism_param=iv) == b"still here"
            done += 1
            time.sleep(0.25)
    print(done)
    """
)


def test_module_renews_its_login_past_the_lifetime(fresh_service, tmp_path: Path) -> None:
    ttl = 3
    svc: Service = fresh_service(overrides={"activation_ttl": ttl})
    admin = Api(svc)
    name = "long" + uuid.uuid4().hex[:10]
    admin.ok(
        admin.post(
            "/km/v1/softcards", {"name": name, "passphrase": b64(PASS.encode())}, idem=new_idem()
        )
    )
    admin.close()
    log = tmp_path / "module.log"
    env = _env(svc.client_cfg, P11PIN=PASS, PKCS11WS_LOGLEVEL="5", PKCS11WS_LOGFILEPATH=str(log))
    started = time.monotonic()
    argv = [sys.executable, "-c", _LONG_RUN, module_path(), name, str(3 * ttl)]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started > 3 * ttl
    assert int(r.stdout.strip()) >= 8
    text = log.read_text()
    assert "login renewed" in text and "the service ended the login" not in text
    # The module's request ids are in the service's audit trail: follow the renewals.
    audit = [json.loads(x) for x in (svc.dir / "log" / "audit.log").read_text().splitlines()]
    renewals = [x for x in audit if x["op"] == "renew" and x["outcome"] == "ok"]
    assert len(renewals) >= 2
    for x in renewals:
        assert x["client"] == "admin" and x["request"] and f"[{x['request']}]" in text
