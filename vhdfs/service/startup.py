"""The start-up pause of Python's cyclic garbage collector: off while a command imports and opens.

trio, attrs and pyfuse3 create tens of thousands of container objects while they import; with
the collector on, that sets off dozens of collections, some of them full passes over everything
made so far: ~40 ms of a mount's launch -> first read here. The CLI pauses the collector first
thing (``pause``) and resumes it when start-up is over (``resume``): a command that runs to its
end right after its arguments are parsed, the FUSE daemon once it serves (``fs.daemon``).
Resuming first moves every object made so far (modules, classes, the opened images) into the
permanent generation, so later collections never walk them again. Reference counting frees
everything acyclic meanwhile; only cyclic garbage made during start-up waits, a bounded amount.
"""

from __future__ import annotations

import gc


def pause() -> None:
    gc.disable()


def resume() -> None:
    """Turn the collector back on (a no-op unless ``pause`` turned it off)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
