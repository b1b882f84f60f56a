"""Every named bad image (``test_bad_images.py``): the VHD cases, then the VDI and VHDX ones."""

from __future__ import annotations

from .cases_vdi import VDI_CASES
from .cases_vhd import VHD_CASES
from .cases_vhdx import VHDX_CASES
from .synthetic import Built, Case

__all__ = ["CASES", "Built", "Case"]

CASES: list[Case] = VHD_CASES + VDI_CASES + VHDX_CASES
