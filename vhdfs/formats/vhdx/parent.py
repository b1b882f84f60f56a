"""Finding a differencing VHDX's parent on Linux, and checking it is the right one (§2.6.2.6).

The locator's paths are Windows paths written on the machine that made the chain, so each is
turned into candidates that can exist *here*: ``relative_path`` resolved against the child's
folder (not the working directory; backslashes become ``/``, a leading ``.\\`` is dropped), then
``volume_path`` and ``absolute_win32_path`` with their drive or volume removed, re-rooted under
the child's folder, and as a bare name beside the child; then that name in every
``--parent-dir`` (``chain.py`` adds those through ``Driver.parent_candidates``).

The parent's DataWriteGuid must equal ``parent_linkage`` *or* ``parent_linkage2`` (a MUST in the
spec; dissect skips it); ``VhdxParentRef.matches`` accepts either, so ``chain.py``'s generic
refusal ("not found with id ..., pass --ignore-parent-id") applies unchanged.
"""

from __future__ import annotations

import ntpath
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...block.image import ParentRef

if TYPE_CHECKING:
    from ...block.image import Image

_VOLUME = re.compile(r"^\\\\[?.]\\(Volume\{[^}]*\}|[A-Za-z]:)", re.IGNORECASE)


def parse_guid(text: str | None) -> uuid.UUID | None:
    """A GUID as Hyper-V writes it (``{...}``), or None when absent, malformed or all zero."""
    if not text:
        return None
    try:
        g = uuid.UUID(text.strip().strip("{}"))
    except ValueError:
        return None
    return None if g.int == 0 else g


@dataclass
class VhdxParentRef(ParentRef):
    """A ParentRef whose identity check accepts any of several DataWriteGuids."""

    accepted: tuple[uuid.UUID, ...] = ()
    locator: dict[str, str] = field(default_factory=dict)

    def matches(self, parent: Image) -> bool:
        got = parse_guid(parent.identity())
        return got is not None and got in self.accepted


def _windows_tail(value: str) -> str:
    """The part of a Windows absolute path after its drive, volume or UNC share, as posix."""
    v = value.strip()
    m = _VOLUME.match(v)
    if m:
        rest = v[m.end() :]
    else:
        _drive, rest = ntpath.splitdrive(v)
    return rest.replace("\\", "/").lstrip("/")


def _relative(value: str) -> str:
    v = value.strip().replace("\\", "/")
    while v.startswith("./"):
        v = v[2:]
    return v


def candidates(child_path: str, locator: dict[str, str]) -> tuple[list[str], list[str]]:
    """(paths to try in order, basenames for --parent-dir) from a parent locator."""
    folder = os.path.dirname(os.path.abspath(child_path))
    out: list[str] = []
    names: list[str] = []
    rel = locator.get("relative_path")
    if rel and _relative(rel):
        r = _relative(rel)
        out.append(r if r.startswith("/") else os.path.join(folder, r))
        names.append(os.path.basename(r))
    for key in ("volume_path", "absolute_win32_path"):
        value = locator.get(key)
        if not value:
            continue
        if value.startswith("/"):  # written on a posix system
            out.append(value)
        tail = _windows_tail(value)
        if tail:
            out.append(os.path.join(folder, tail))
            out.append(os.path.join(folder, os.path.basename(tail)))
            names.append(os.path.basename(tail))
    unique_paths = list(dict.fromkeys(os.path.normpath(p) for p in out))
    unique_names = [n for n in dict.fromkeys(names) if n]
    return unique_paths, unique_names


def parent_ref(child_path: str, locator: dict[str, str]) -> VhdxParentRef:
    accepted = tuple(
        g
        for g in (parse_guid(locator.get("parent_linkage")), parse_guid(locator.get("parent_linkage2")))
        if g is not None
    )
    paths, names = candidates(child_path, locator)
    shown = " or ".join(str(g) for g in accepted) or "(no parent_linkage)"
    name = names[0] if names else (locator.get("relative_path") or "(unnamed parent)")
    return VhdxParentRef(
        name=name,
        expected_id=shown,
        candidates=paths,
        search_names=names,
        format="vhdx",
        accepted=accepted,
        locator=dict(locator),
    )
