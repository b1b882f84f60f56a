#!/usr/bin/env bash
# Long reliability soak (issue 6): kill -9 rounds over real FUSE mounts, random hostile-image
# fuzzing, then coverage-guided fuzzing with atheris. Prints counts; exit 1 on any failure.
#
#   tools/soak.sh                        # 200 rounds, 5000 random cases, 5000 atheris runs
#   ROUNDS=1000 CASES=20000 ATHERIS_RUNS=50000 tools/soak.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
ROUNDS=${ROUNDS:-200}
CASES=${CASES:-5000}
ATHERIS_RUNS=${ATHERIS_RUNS:-5000}
rc=0
$PY -m tools.soak --rounds "$ROUNDS" --fuzz-cases "$CASES" ${SEED:+--seed "$SEED"} || rc=1
if $PY -c 'import atheris' 2>/dev/null; then
    $PY -m tools.fuzz_atheris -atheris_runs="$ATHERIS_RUNS" 2> >(grep -v -E '^#[0-9]+|^INFO:|^Done' >&2) || rc=1
else
    echo "atheris not installed (pip install atheris): coverage-guided fuzzing skipped"
fi
exit $rc
