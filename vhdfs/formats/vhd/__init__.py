"""VHD (Virtual PC, Hyper-V, Disk2vhd, Azure, XenServer): fixed, dynamic and differencing.

This module is only the format's entry in the registry: each entry point is imported when it is
first called (``block.driver.deferred``), so opening a VHD loads neither the other formats nor
VHD's own create, resize and compact code. ``layer.open_layer`` opens one layer.
"""

from __future__ import annotations

from ...block.driver import Driver, DriverOption, deferred, deferred_value

SIZE_RULE = DriverOption(
    name="size_rule",
    flag="--size-rule",
    choices=("auto", "chs", "current"),
    default="auto",
    help="VHD virtual size: auto (QEMU 10's rule), chs or current",
)


DRIVER = Driver(
    name="vhd",
    title="VHD",
    suffixes=(".vhd", ".avhd"),
    probe=deferred(f"{__name__}.magic", "probe"),
    probe_slow=deferred(f"{__name__}.footer", "probe_padded"),
    open_layer=deferred(f"{__name__}.layer", "open_layer"),
    create=deferred(f"{__name__}.create", "create_from_spec"),
    limits=deferred_value(f"{__name__}.create", "LIMITS"),
    options=(SIZE_RULE,),
    resize=deferred(f"{__name__}.resize", "resize"),
    compact=deferred(f"{__name__}.compact", "compact"),
    repair=deferred(f"{__name__}.repair", "repair"),
)
