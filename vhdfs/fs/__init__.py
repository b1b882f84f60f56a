"""The FUSE front end: ``daemon`` mounts and serves, ``operations`` answers the kernel's requests.

Importing this package imports pyfuse3 without ``importlib.metadata``. pyfuse3 3.5 imports that
module (and through it email, zipfile, csv and pathlib: ~40 ms here, a sixth of a mount's
launch -> first read) only to set ``pyfuse3.__version__``. While pyfuse3 loads, a stand-in
answers that one call from the ``pyfuse3-<version>.dist-info`` folder beside the package, and
it is taken out again right after: whoever imports ``importlib.metadata`` later gets the real
module. Should a later pyfuse3 ask the stand-in for anything else, pyfuse3 is imported again
the ordinary way.
"""

from __future__ import annotations

import os
import sys
import types


class _PackageNotFoundError(ModuleNotFoundError):
    """What ``importlib.metadata.version`` raises for a package it does not find."""


def _installed_version(name: str) -> str:
    """``name``'s version from the ``<name>-<version>.dist-info`` folder beside its package."""
    module = sys.modules.get(name)
    where = getattr(module, "__file__", None)
    if where:
        folder = os.path.dirname(os.path.dirname(where))
        prefix = f"{name}-"
        try:
            for entry in os.listdir(folder):
                if entry.startswith(prefix) and entry.endswith(".dist-info"):
                    return entry[len(prefix) : -len(".dist-info")]
        except OSError:
            pass
    raise _PackageNotFoundError(name)


def _import_pyfuse3() -> None:
    if "pyfuse3" in sys.modules or "importlib.metadata" in sys.modules:
        return  # already paid for, or nothing left to save (daemon and operations import it)
    stand_in = types.ModuleType("importlib.metadata")
    stand_in.PackageNotFoundError = _PackageNotFoundError  # type: ignore[attr-defined]
    stand_in.version = _installed_version  # type: ignore[attr-defined]
    sys.modules["importlib.metadata"] = stand_in
    try:
        import pyfuse3
    except ImportError:
        for name in [m for m in sys.modules if m == "pyfuse3" or m.startswith("pyfuse3.")]:
            del sys.modules[name]
        sys.modules.pop("importlib.metadata", None)
        import pyfuse3  # noqa: F401
    finally:
        if sys.modules.get("importlib.metadata") is stand_in:
            del sys.modules["importlib.metadata"]


_import_pyfuse3()
