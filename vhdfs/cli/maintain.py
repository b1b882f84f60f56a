"""Shared by ``resize``, ``compact`` and ``check --repair``: refuse an image a vhdfs mount serves.

The file lock already refuses an image another process holds (a writable mount's exclusive
lock, a read-only mount's shared one); the mount records add *where* it is mounted.
"""

from __future__ import annotations

import glob
import json
import os

from ..errors import BusyError


def refuse_if_mounted(path: str, force: bool = False) -> None:
    from ..service.state import state_dir

    real = os.path.realpath(path)
    for record in glob.glob(os.path.join(state_dir(), "*.json")):
        try:
            with open(record) as fh:
                data = json.load(fh)
            pid = int(data.get("pid", 0))
            images = [os.path.realpath(p) for p in data.get("images", [])]
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if real in images and pid > 0 and os.path.exists(f"/proc/{pid}"):
            raise BusyError(f"is mounted at {data.get('mountpoint', '?')} (vhdfs umount it first)", path)
