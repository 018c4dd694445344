"""Build glue: the Cython core (pkcs11ws/_native/core) and the C loader libpkcs11ws.so.

The loader is not a Python extension: it is the PKCS#11 module hosts dlopen(). It is compiled
after the extensions (it includes core_api.h, which cythonize writes) and lands next to them in
pkcs11ws/_native/. It exports only C_* (hidden visibility plus a version script), links libpython
with an RPATH to its directory, and is linked -z nodelete (design.md section 2). The interpreter
that runs this build is baked in as the one the loader boots (its venv's site-packages are then
importable from inside any host).
"""

from __future__ import annotations

import os
import sys
import sysconfig

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.join("pkcs11ws", "_native")
LOADER_NAME = "libpkcs11ws.so"
LOADER_SOURCES = [os.path.join(NATIVE, "loader.c")]
LOADER_DEPENDS = [
    os.path.join(NATIVE, n) for n in ("trampolines.h", "pyglue.h", "core_api.h", "loader.c")
] + [os.path.join("include", n) for n in ("pkcs11ws_ck.h", "pkcs11ws_const.h", "pkcs11ws_funcs.h")]
VERSION_SCRIPT = "{ global: C_*; local: *; };\n"


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class BuildExtWithLoader(build_ext):
    """build_ext, then the loader into the same package directory."""

    def run(self) -> None:
        super().run()
        self.build_loader()

    def loader_path(self) -> str:
        core = self.get_ext_fullpath("pkcs11ws._native.core")
        return os.path.join(os.path.dirname(core), LOADER_NAME)

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), self.loader_path()]

    def build_loader(self) -> None:
        out = self.loader_path()
        newest = max(os.path.getmtime(p) for p in [*LOADER_DEPENDS, __file__])
        if not self.force and os.path.exists(out) and os.path.getmtime(out) >= newest:
            return
        libdir = sysconfig.get_config_var("LIBDIR")
        ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
        if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not ldlib.startswith("lib"):
            raise SystemExit("libpkcs11ws.so needs a Python built with --enable-shared")
        pylib = ldlib[3:].split(".so")[0]
        macros = [("P11WS_PYTHON_EXE", _c_string(sys.executable)),
                  ("P11WS_SITE", _c_string(sysconfig.get_paths()["purelib"]))]  # fmt: skip
        if self.inplace:
            # An editable install: the package stays in the source tree.
            macros.append(("P11WS_PKG_PARENT", _c_string(HERE)))
        os.makedirs(self.build_temp, exist_ok=True)
        script = os.path.join(self.build_temp, "libpkcs11ws.map")
        with open(script, "w") as f:
            f.write(VERSION_SCRIPT)
        cc = self.compiler
        objects = cc.compile(
            LOADER_SOURCES,
            output_dir=self.build_temp,
            macros=macros,
            include_dirs=["include", NATIVE, sysconfig.get_paths()["include"]],
            extra_postargs=["-fvisibility=hidden", "-O2", "-Wall", "-Wextra",
                            "-Wno-unused-parameter", "-fPIC"],
        )  # fmt: skip
        cc.link_shared_object(
            objects,
            out,
            libraries=[pylib, "dl", "pthread"],
            library_dirs=[libdir],
            runtime_library_dirs=[libdir],
            extra_postargs=[f"-Wl,--version-script={script}", "-Wl,-z,nodelete",
                            "-Wl,--no-undefined"],
        )  # fmt: skip


extensions = [
    Extension(
        "pkcs11ws._native.core",
        [os.path.join(NATIVE, "core.pyx")],
        include_dirs=["include", NATIVE],
        depends=[os.path.join(NATIVE, n) for n in ("tables.pxi", "objects.pxi", "crypto.pxi",
                                                   "multipart.pxi", "funcs.pxi", "ck.pxd",
                                                   "ck_gen.pxd", "pyglue.h", "probe.h")],
    ),
]  # fmt: skip

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False},
    ),
    cmdclass={"build_ext": BuildExtWithLoader},
)
