"""Every format vhdfs reads, one package (or module) each, and the one registry of them.

A new format is its own package exporting ``DRIVER`` (see ``vhdfs.block.driver``) plus one name
in ``DRIVERS`` below; nothing else in vhdfs names a format. Order matters only for ties of the
probe score; ``raw`` comes last and never wins a probe (it is chosen by ``--format raw``).
"""

from __future__ import annotations

from ..block.driver import Driver
from . import raw, vdi, vhd, vhdx

DRIVERS: tuple[Driver, ...] = (vhd.DRIVER, vdi.DRIVER, vhdx.DRIVER, raw.DRIVER)
