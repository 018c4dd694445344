"""Build glue: compiles the Cython core (pkcs11ws/_native)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "pkcs11ws._native.core",
        ["pkcs11ws/_native/core.pyx"],
        include_dirs=["include"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False},
    ),
)
