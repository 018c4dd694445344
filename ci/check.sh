#!/usr/bin/env bash
# Static checks: ruff (format + lint), mypy, cython-lint. Run by `make test` and so by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
export PATH="$PWD/$bin:$PATH"  # cython-lint runs pycodestyle by name
$bin/ruff format --check .
$bin/ruff check .
$bin/mypy pkcs11ws bench tests
$bin/cython-lint --max-line-length 100 pkcs11ws/_native pkcs11ws/server/_hot.pyx
echo "checks: ok"
