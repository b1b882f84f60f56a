#!/usr/bin/env bash
# Install what is needed, check the package (ruff lint and format, mypy), then run the whole
# suite. Takes no arguments (extra ones go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
echo "tests/run.sh: ruff and mypy over vhdfs/"
.venv/bin/ruff check --quiet vhdfs
.venv/bin/ruff format --check --quiet vhdfs
.venv/bin/mypy --no-error-summary
set +e
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@" tests
rc=$?
set -e
# pytest's 5 means "no tests collected": a suite that ran nothing has failed.
exit $rc
