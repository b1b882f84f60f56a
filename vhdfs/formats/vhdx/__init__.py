"""VHDX ([MS-VHDX] v2): Hyper-V's format since 2012 -- fixed, dynamic and differencing.

The pure layer (``spec``/``logspec`` structures, ``log`` replay planning, ``layout`` open-time
parsing) reads bytes and never writes; ``image.VhdxImage`` maps virtual offsets (``bat``,
``bitmap``), ``overlay`` replays a dirty log in memory for read-only opens, ``write`` holds the
write path (its headers and log through ``journal`` onto ``wal.VhdxLog``), ``parent``
finds and checks parents; ``resize`` and ``compact`` (over ``space``) are the maintenance
hooks; ``layer`` opens one layer. This module is only the registry entry: each entry point is
imported when first called (``block.driver.deferred``).
"""

from __future__ import annotations

from ...block.driver import CERTAIN, NO, Driver, ProbeData, deferred, deferred_value

SUFFIXES = (".vhdx", ".avhdx")


def probe(data: ProbeData) -> int:
    from . import spec

    return CERTAIN if data.head[:8] == spec.FILE_ID_SIGNATURE else NO


DRIVER = Driver(
    name="vhdx",
    title="VHDX",
    suffixes=SUFFIXES,
    probe=probe,
    open_layer=deferred(f"{__name__}.layer", "open_layer"),
    create=deferred(f"{__name__}.create", "create_from_spec"),
    limits=deferred_value(f"{__name__}.create", "LIMITS"),
    resize=deferred(f"{__name__}.resize", "resize"),
    compact=deferred(f"{__name__}.compact", "compact"),
    repair=deferred(f"{__name__}.layer", "repair"),
)
