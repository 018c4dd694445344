"""The client tarball (`make dist`), installed the user guide's way (2.1): extracted at / on a
machine where this checkout and the project's own Python are out of sight.

The install runs in a private mount namespace (unshare --mount): a tmpfs over /opt takes the
extraction (the machine's real /opt is untouched), and tmpfs mounts hide this checkout and the
interpreter the project's venv is built on, so only Debian's python3.11 is left. The README's
install block runs as written (tar -xzf ... -C /, the example copied to the config). Then
ckcheckinst (with a softcard self-test) and pkcs11-tool run from PATH=/usr/bin:/bin against the
real key service, and a second extraction keeps conf/pkcs11webservices.cfg.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import pkcs11ws
from tests.support.dropin_util import snippet
from tests.support.packaging_util import ROOT, client_tarball, outside_env
from tests.support.tools_util import activated_card

PREFIX = "opt/nfast/webservices/pkcs11"
UTILITIES = ["ckcheckinst", "ckinfo-dynamic", "cklist-dynamic", "ckmechinfo", "softcardtool"]


def test_tarball_name_and_layout():
    tarball = client_tarball()
    arch = os.uname().machine
    assert tarball.name == f"pkcs11ws-client-{pkcs11ws.__version__}-linux-{arch}.tar.gz"
    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in (
            f"{PREFIX}/lib/libpkcs11webservices.so",
            f"{PREFIX}/conf/example_pkcs11webservices.cfg",
            *(f"{PREFIX}/bin/{t}" for t in UTILITIES),
        ):
            assert members[name].isfile() and members[name].uid == 0, name
        assert members[f"{PREFIX}/log"].isdir()
        for t in UTILITIES:
            assert members[f"{PREFIX}/bin/{t}"].mode & 0o111, t
        # Never a configuration: extracting again must keep the administrator's.
        assert f"{PREFIX}/conf/pkcs11webservices.cfg" not in members
        py = members[f"{PREFIX}/runtime/bin/python3.11"]
        assert py.issym() and py.linkname == "/usr/bin/python3.11"
        cfg = tar.extractfile(f"{PREFIX}/runtime/pyvenv.cfg").read().decode()  # type: ignore[union-attr]
        assert "home = /usr/bin" in cfg
        # Nothing names the build: neither this checkout nor the staging folder.
        for m in members.values():
            if m.isfile() and (m.name.endswith((".so", ".cfg", ".pyc")) or "/bin/" in m.name):
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                assert str(ROOT).encode() not in data, m.name
                assert b"build/dist" not in data, m.name


def _hidden() -> list[str]:
    """Folders the namespace covers: this checkout and the project interpreter's prefix."""
    hide = [str(ROOT)]
    base = os.path.realpath(sys.base_prefix)
    if not base.startswith("/usr"):
        hide.append(base)
    return hide


SCRIPT = r"""
set -u
mount -t tmpfs pkcs11ws-opt /opt || exit 90
for d in $HIDE; do mount -t tmpfs pkcs11ws-hidden "$d" || exit 91; done
P=/opt/nfast/webservices/pkcs11
cd "$(dirname "$TARBALL")"
sh -ec "$README_INSTALL" || exit 92
cmp -s $P/conf/example_pkcs11webservices.cfg $P/conf/pkcs11webservices.cfg || exit 94
cd /
cp "$CLIENT_CFG" $P/conf/pkcs11webservices.cfg
echo "== checkout visible: $(ls -A "$CHECKOUT" | wc -l)"
echo "== ckcheckinst"
printf '%s\n' "$CARD_PASSPHRASE" | $P/bin/ckcheckinst --softcard "$CARD" 2>&1
echo "== rc $?"
echo "== pkcs11-tool"
pkcs11-tool --module $P/lib/libpkcs11webservices.so -L 2>&1
echo "== rc $?"
echo "== ckmechinfo"
$P/bin/ckmechinfo --library $P/lib/libpkcs11webservices.so 2>&1 | head -3
echo "== reinstall"
echo "# the administrator's edit" >> $P/conf/pkcs11webservices.cfg
tar -xzf "$TARBALL" -C / || exit 93
tail -1 $P/conf/pkcs11webservices.cfg
"""


def readme_install(tarball: Path) -> str:
    """The README's tarball block (snippet install-tarball) as written, less its apt-get line
    (whose packages this machine must already have: checked, not run)."""
    block = snippet("install-tarball")
    apt, rest = block.split("\n", 1)
    assert apt.startswith("apt-get install ")
    for pkg in apt.split()[2:]:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False
        )
        assert "install ok installed" in res.stdout, f"README names {pkg}, which is not installed"
    name = tarball.name.replace(f"-linux-{os.uname().machine}.", "-linux-x86_64.")
    assert f"tar -xzf {name} -C /" in rest, "README.md names another tarball than make dist"
    return rest.replace(name, tarball.name)


def sections(out: str) -> dict[str, str]:
    parts: dict[str, list[str]] = {}
    key = ""
    for line in out.splitlines():
        if line.startswith("== "):
            key = line[3:]
            parts[key] = []
        elif key:
            parts[key].append(line)
    return {k: "\n".join(v) for k, v in parts.items()}


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs root and unshare (CI runs as root)",
)
def test_extracted_at_root_without_the_checkout(service, tmp_path):
    tarball = client_tarball()
    # The tarball must be reachable once the checkout is hidden.
    local = tmp_path / tarball.name
    shutil.copy2(tarball, local)
    card = activated_card(service)
    real_opt_had_it = Path("/opt/nfast/webservices/pkcs11").exists()
    env = outside_env(
        TARBALL=str(local),
        README_INSTALL=readme_install(local),
        CLIENT_CFG=str(service.client_cfg),
        CARD=card.name,
        CARD_PASSPHRASE=card.passphrase,
        HIDE=" ".join(_hidden()),
        CHECKOUT=str(ROOT),
    )
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = sections(res.stdout)
    assert out["checkout visible: 0"] == ""
    check = out["ckcheckinst"]
    assert "Traceback" not in check
    assert "checks passed" in check, check
    assert "/opt/nfast/webservices/pkcs11/conf/pkcs11webservices.cfg" in check
    assert f"token label        : {card.name}" in out["pkcs11-tool"], out["pkcs11-tool"]
    assert "CKM_" in out["ckmechinfo"], out["ckmechinfo"]
    assert out["reinstall"] == "# the administrator's edit"
    assert res.stdout.count("== rc 0") == 2, res.stdout
    # The machine's own /opt never saw the extraction.
    assert Path("/opt/nfast/webservices/pkcs11").exists() == real_opt_had_it
