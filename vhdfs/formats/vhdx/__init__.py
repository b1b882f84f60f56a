"""VHDX (Microsoft [MS-VHDX] v2): pure on-disk layer -- structures, log replay planning, open-time parsing."""
