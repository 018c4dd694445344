"""The wheel as a new user installs it: a wheel built from this tree's sdist (the session builds
it once, with `make dist`, which builds it from the sdist on Debian's python3.11: the same PEP 517
build from the sdist as the README's `python -m build`); the wheel goes into a brand-new venv,
first the way plain pip does it (it picks the PyPI pycurl wheel, which the module and the
utilities refuse in one line that gives the fix), then fixed exactly as that line says;
pkcs11-tool then drives the module from the venv against the real key service. Every command
runs outside this checkout (cwd elsewhere, PATH=/usr/bin:/bin).
"""

from __future__ import annotations

import email
import re
import shlex
import shutil
import subprocess
import tarfile
import venv
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import pkcs11ws
from tests.support.dropin_util import snippet
from tests.support.packaging_util import ROOT, outside_env, sdist_and_wheel, workdir
from tests.support.tools_util import activated_card

VERSION = pkcs11ws.__version__
UTILITIES = ["ckcheckinst", "ckinfo-dynamic", "cklist-dynamic", "ckmechinfo", "softcardtool"]


def run(
    cmd: Sequence[str | Path], env: dict[str, str], stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        check=False,
        env=env,
        cwd=workdir(),
    )


def test_sdist_holds_every_source():
    sdist, _ = sdist_and_wheel()
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in (
        "LICENSE",
        "MANIFEST.in",
        "setup.py",
        "pyproject.toml",
        "README.md",
        "conf/example_pkcs11webservices.cfg",
        "include/pkcs11ws_ck.h",
        "include/pkcs11ws_const.h",
        "include/pkcs11ws_funcs.h",
        "pkcs11ws/_native/core.pyx",
        "pkcs11ws/_native/funcs.pxi",
        "pkcs11ws/_native/ck_gen.pxd",
        "pkcs11ws/_native/loader.c",
        "pkcs11ws/_native/bootstrap.c",
        "pkcs11ws/_native/trampolines.h",
        "pkcs11ws/_native/pyglue.h",
        "pkcs11ws/_native/runtime.h",
        "pkcs11ws/server/_hot.pyx",
        "pkcs11ws/server/_hot.pyi",
        "tools/gen_native.py",
    ):
        assert need in names, need
    # Every source the build reads, and nothing built.
    for src in (ROOT / "pkcs11ws" / "_native").iterdir():
        if src.suffix in (".pyx", ".pxi", ".pxd", ".h") and src.name != "core_api.h":
            assert f"pkcs11ws/_native/{src.name}" in names, src.name
    cython_out = ("pkcs11ws/_native/core.c", "pkcs11ws/_native/sqlmark.c", "pkcs11ws/server/_hot.c")
    assert not [n for n in names if n.endswith((".so", ".o")) or n in cython_out]


def test_wheel_metadata_and_no_build_path():
    _, wheel = sdist_and_wheel()
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = email.message_from_bytes(z.read(f"pkcs11ws-{VERSION}.dist-info/METADATA"))
        assert meta["Version"] == VERSION
        assert meta["License-Expression"] == "Apache-2.0"
        assert "Apache License" in z.read(f"pkcs11ws-{VERSION}.dist-info/licenses/LICENSE").decode()
        assert "pkcs11ws/_data/example_pkcs11webservices.cfg" in names
        assert not [n for n in names if n.endswith((".pyx", ".pxi", ".c"))]
        objects = {n: z.read(n) for n in names if n.endswith(".so")}
    assert set(objects) >= {
        "pkcs11ws/_native/libpkcs11ws.so",
        "pkcs11ws/_native/libpkcs11ws-python.so",
    }
    assert any(n.startswith("pkcs11ws/server/_hot.") for n in objects)  # the service's helpers
    assert "pkcs11ws/server/_hot.pyi" in names
    extracted = workdir() / "wheel-objects"
    extracted.mkdir(exist_ok=True)
    for name, data in objects.items():
        # No path of the build machine: the source tree, the temporary build folders (pip's,
        # under /tmp), the build interpreter's headers (the runtime is found at run time).
        for bad in (str(ROOT), "/tmp/", "build-env", "pip-req-build", "include/python3.11"):
            assert bad.encode() not in data, (name, bad)
        path = extracted / Path(name).name
        path.write_bytes(data)
        dyn = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
        assert "RPATH" not in dyn and "RUNPATH" not in dyn, name


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory) -> Path:
    """A brand-new venv with the wheel installed by plain pip (so the PyPI pycurl wheel)."""
    _, wheel = sdist_and_wheel()
    d = tmp_path_factory.mktemp("wheel-venv") / "venv"
    venv.EnvBuilder(with_pip=True).create(d)
    res = run([d / "bin" / "pip", "install", "-q", wheel], outside_env(), timeout=600)
    assert res.returncode == 0, res.stderr
    return d


def _fix_line(line: str) -> list[str]:
    """The command after 'fix: ' in a refusal line, up to the parenthesised note."""
    cmd = line.split("fix: ", 1)[1].split(" (needs", 1)[0]
    return shlex.split(cmd)


@pytest.fixture(scope="module")
def refusals(plain_venv, service, tmp_path_factory) -> dict[str, Any]:
    """What plain_venv answers before it is fixed: fixed_venv fixes that same venv in place and
    requests this fixture first, so the random order of the tests cannot show the refusal test a
    venv that was already fixed."""
    site = plain_venv / "lib" / "python3.11" / "site-packages"
    log = tmp_path_factory.mktemp("refusal") / "module.log"
    env = outside_env(PKCS11WS_CONFIG=str(service.client_cfg), PKCS11WS_LOGFILEPATH=str(log))
    module = run([plain_venv / "bin" / "python", "-m", "pkcs11ws", "module-path"], env)
    return {
        "wheel_libs": (site / "pycurl.libs").is_dir(),
        "site": site,
        "softcardtool": run([plain_venv / "bin" / "softcardtool", "-l"], env),
        "ckcheckinst": run([plain_venv / "bin" / "ckcheckinst"], env),
        "pkcs11-tool": run(["pkcs11-tool", "--module", module.stdout.strip(), "-L"], env),
        "log": log.read_text() if log.exists() else "",
    }


def test_pypi_pycurl_wheel_refused_in_one_line(plain_venv, refusals):
    assert refusals["wheel_libs"], "plain pip did not install the PyPI pycurl wheel"
    # The venv's own interpreter (bin/python or bin/python3.11, as the script was started).
    fix = re.compile(
        rf"fix: {re.escape(str(plain_venv))}/bin/python[0-9.]* -m pip install --force-reinstall "
        r"--no-deps --no-binary pycurl pycurl \(needs "
    )

    res = refusals["softcardtool"]
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("softcardtool: pycurl in "), res.stderr
    assert "is the PyPI wheel" in lines[0] and fix.search(lines[0])

    res = refusals["ckcheckinst"]
    assert res.returncode == 1
    assert "Traceback" not in res.stdout + res.stderr
    failed = [ln for ln in res.stdout.splitlines() if ln.startswith("FAILED")]
    assert any("is the PyPI wheel" in ln and fix.search(ln) for ln in failed), res.stdout

    res = refusals["pkcs11-tool"]
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert (
        f"libpkcs11ws: C_Initialize: pycurl in {refusals['site']} is the PyPI wheel" in res.stderr
    )
    assert fix.search(res.stderr)
    assert "is the PyPI wheel" in refusals["log"] and fix.search(refusals["log"])


@pytest.fixture(scope="module")
def fixed_venv(plain_venv, refusals, service) -> Path:
    """plain_venv after running the command the refusal line gives (in place: `refusals` has
    recorded the venv as plain pip left it before)."""
    env = outside_env(PKCS11WS_CONFIG=str(service.client_cfg))
    res = run([plain_venv / "bin" / "softcardtool", "-l"], env)
    if res.returncode == 0:
        return plain_venv  # already fixed
    fix = _fix_line(res.stderr)
    assert Path(fix[0]).parent == plain_venv / "bin", fix
    res = run(fix, outside_env(), timeout=900)
    assert res.returncode == 0, res.stderr
    return plain_venv


def test_fixed_venv_drives_pkcs11_tool(fixed_venv, service):
    env = outside_env(PKCS11WS_CONFIG=str(service.client_cfg), PKCS11WS_RETRYDELAY="0")
    site = fixed_venv / "lib" / "python3.11" / "site-packages"
    assert not (site / "pycurl.libs").exists()
    res = run([fixed_venv / "bin" / "python", "-m", "pkcs11ws", "module-path"], env)
    assert res.returncode == 0, res.stderr
    module = Path(res.stdout.strip())
    assert module == site / "pkcs11ws" / "_native" / "libpkcs11ws.so"
    card = activated_card(service)
    res = run(["pkcs11-tool", "--module", module, "-L"], env)
    assert res.returncode == 0, res.stderr
    assert f"token label        : {card.name}" in res.stdout
    res = run(["pkcs11-tool", "--module", module, "-I"], env)
    major, minor = VERSION.split(".")[:2]
    assert res.returncode == 0 and f"(ver {major}.{minor})" in res.stdout, res.stdout
    res = run(
        [fixed_venv / "bin" / "ckcheckinst", "--softcard", card.name],
        env,
        stdin=card.passphrase + "\n",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checks passed" in res.stdout


def test_versions_agree(fixed_venv):
    env = outside_env()
    res = run([fixed_venv / "bin" / "pkcs11ws", "--version"], env)
    assert res.returncode == 0 and res.stdout.strip() == f"pkcs11ws {VERSION}", res
    res = run([fixed_venv / "bin" / "python", "-m", "pkcs11ws", "--version"], env)
    assert res.stdout.strip() == f"pkcs11ws {VERSION}"
    for tool in UTILITIES:
        res = run([fixed_venv / "bin" / tool, "-V"], env)
        assert res.returncode == 0, (tool, res.stderr)
        assert f"(pkcs11ws {VERSION})" in res.stdout, (tool, res.stdout)


def test_readme_install_lines_as_written(service, tmp_path):
    # The README's wheel block (its snippet install-wheel, which must name the wheel the build
    # makes), run by sh from a folder holding dist/ with the built wheel; only
    # its example venv path is moved into the test's folder. python3.11 on PATH=/usr/bin:/bin
    # is Debian's, so this also drives the module on Debian's libpython.
    _, wheel = sdist_and_wheel()
    block = snippet("install-wheel", {f"dist/{wheel.name}": f"dist/{wheel.name}"})
    (tmp_path / "dist").mkdir()
    shutil.copy2(wheel, tmp_path / "dist" / wheel.name)
    target = tmp_path / "srv" / "pkcs11ws"
    res = subprocess.run(
        ["sh", "-ec", block.replace("/srv/pkcs11ws", str(target))],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=outside_env(),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    module = res.stdout.strip().splitlines()[-1]
    assert module == f"{target}/lib/python3.11/site-packages/pkcs11ws/_native/libpkcs11ws.so"
    card = activated_card(service)
    env = outside_env(PKCS11WS_CONFIG=str(service.client_cfg))
    res = run(["pkcs11-tool", "--module", module, "-L"], env)
    assert res.returncode == 0, res.stderr
    assert f"token label        : {card.name}" in res.stdout
