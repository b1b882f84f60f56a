"""Long-running reliability tools, apart from the benchmark: ``soak`` and ``fuzz_atheris``.

Run them from the repository root as modules (``.venv/bin/python -m tools.soak``, or
``tools/soak.sh`` for both). They reuse the test suite's helpers: ``tests/images`` (the
independent writers, the corpus, the hostile-image fuzzing) and ``tests/test_kill9.py``. Those
modules import each other the way pytest runs them, with ``tests/`` on ``sys.path``; this is the
one place the tools put it there.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
