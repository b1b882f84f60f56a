"""What a format is, in one object: the ``Driver`` every format package exports as ``DRIVER``.

The counterpart of QEMU's ``BlockDriver`` table. Everything the rest of vhdfs needs to know
about a format -- its name and file suffixes, how to recognise it (a probe *score*, so the most
certain driver wins), how to open one layer, how to create an image or a child, where to look
for a parent, its limits and its own open options -- is read from here. The CLI's ``--format``
choices, the suffix guess of ``create``/``convert``, the "not an image" message and the layering
test all derive from :func:`drivers`, so a new format is one package plus one registry line in
``vhdfs/formats/__init__.py``.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .image import Image, OpenOptions, ParentRef

# Probe scores: the highest wins; ties go to the registry's order.
CERTAIN = 100  # a magic number where the format puts it
LIKELY = 50  # found by a slower second look (a footer followed by padding, ...)
NO = 0


@dataclass(frozen=True)
class ProbeData:
    """What a probe may look at: the file's first and last bytes, its size, and an fd for more."""

    head: bytes  # up to HEAD_BYTES from offset 0
    tail: bytes  # up to TAIL_BYTES before the end
    size: int
    fd: int  # open read-only; a ``probe_slow`` may pread, never seek or close

    HEAD_BYTES = 64 * 1024
    TAIL_BYTES = 1024


@dataclass(frozen=True)
class CreateSpec:
    """A new image to make; validated against the driver's ``Limits`` before ``create`` runs."""

    path: str
    type: str  # "fixed" | "dynamic" | "differencing"
    size: int  # virtual size in bytes (a child: its parent's)
    block_size: int | None = None  # None: the driver's default
    sector_size: int | None = None  # logical sector size; None: the driver's default
    parent: str | None = None  # absolute path of the parent (differencing only)
    parent_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    """What a format can describe, checked once (``tools.create``) for every driver."""

    max_size: int
    types: tuple[str, ...] = ("fixed", "dynamic", "differencing")
    block_sizes: tuple[int, int] | None = None  # (min, max) powers of two; None: no blocks
    fixed_has_blocks: bool = False
    sector_sizes: tuple[int, ...] = (512,)


@dataclass(frozen=True)
class DriverOption:
    """An open option only one format has (VHD's ``--size-rule``), offered by every command."""

    name: str  # key in ``OpenOptions.extra`` and the argparse dest
    flag: str  # "--size-rule"
    choices: tuple[str, ...]
    default: str
    help: str


class Severity(enum.Enum):
    """What a ``check`` finding means for a user (exit 1 only for ERROR)."""

    ERROR = "error"  # damage that loses or hides data
    LEAK = "leak"  # space that is wasted, no data at risk
    NOTE = "note"  # a harmless habit of a real writer


@dataclass(frozen=True)
class Finding:
    severity: Severity
    text: str

    def __str__(self) -> str:
        return self.text


def error(text: str) -> Finding:
    return Finding(Severity.ERROR, text)


def leak(text: str) -> Finding:
    return Finding(Severity.LEAK, text)


def note(text: str) -> Finding:
    return Finding(Severity.NOTE, text)


def default_parent_candidates(child: Image, ref: ParentRef, parent_dirs: tuple[str, ...]) -> list[str]:
    """The child's own locators in order, then each stored name in every ``--parent-dir``."""
    out = list(ref.candidates)
    for folder in parent_dirs:
        out.extend(os.path.join(folder, name) for name in ref.search_names)
    return out


@dataclass(frozen=True)
class Driver:
    """One format. ``probe``/``open_layer``/``create`` are the only entry points a format has."""

    name: str  # "vhd": --format value, messages, ParentRef.format
    title: str  # "VHD": what users call it
    suffixes: tuple[str, ...]  # first = the one new files get
    probe: Callable[[ProbeData], int]  # the first look: head, tail and size only, no more I/O
    open_layer: Callable[[str, OpenOptions], Image]
    create: Callable[[CreateSpec], None] | None
    limits: Callable[[], Limits]  # what ``create`` can make (called: it lives beside create)
    type_names: dict[str, str] = field(default_factory=dict)  # VDI says "static" for fixed
    options: tuple[DriverOption, ...] = ()
    # A second look that reads more of the file (VHD's footer before padding: the last 4 MiB),
    # made only when no driver's first look was CERTAIN: a VHDX open never pays for it.
    probe_slow: Callable[[ProbeData], int] | None = None
    # Where a child's parent may be: paths in order. A driver that scans folders (VDI finds
    # its parent by UUID) sets ``ParentRef.scan`` so unreadable candidates are skipped quietly.
    parent_candidates: Callable[[Image, ParentRef, tuple[str, ...]], list[str]] = default_parent_candidates
    # Maintenance (``tools/maintain.py`` does the shared part: locks, children, zero checks).
    # resize(top layer open writable, requested size, ensure_zero(new size)) -> what it did;
    # the driver applies its own size rules and calls ensure_zero before cutting anything.
    resize: Callable[[Image, int, Callable[[int], None]], list[str]] | None = None
    # compact(top layer open writable, its chain attached, progress(done, total)) -> what it did
    compact: Callable[[Image, Callable[[int, int], None]], list[str]] | None = None
    # repair(path, dry_run, say) -> changes; runs before the image is opened (a table pointing
    # past the end of the file makes a normal open refuse), never touches a parent
    repair: Callable[[str, bool, Callable[[str], None]], list[str]] | None = None

    def suffix_matches(self, path: str | os.PathLike[str]) -> bool:
        return os.fspath(path).lower().endswith(self.suffixes)


def deferred(module: str, name: str) -> Callable[..., Any]:
    """The function ``module.name``, imported only when first called.

    A format package's ``DRIVER`` names its entry points this way, so that importing the
    registry loads no format's code: opening a VHD imports neither VDI nor VHDX, nor VHD's
    own create, resize and compact (a mount's launch -> first read is mostly imports).
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"{module}.{name}"
    return call


def deferred_value(module: str, name: str) -> Callable[[], Any]:
    """``module.name``, a constant, read (and ``module`` imported) only when first asked for."""
    return lambda: getattr(import_module(module), name)


def drivers() -> tuple[Driver, ...]:
    """Every format, in probe order (the one place block/ reaches into formats/, lazily)."""
    from ..formats import DRIVERS

    return DRIVERS


def driver(name: str) -> Driver:
    for d in drivers():
        if d.name == name:
            return d
    raise KeyError(name)


def format_names() -> tuple[str, ...]:
    return tuple(d.name for d in drivers())


def format_from_name(path: str | os.PathLike[str]) -> str | None:
    """The format a file name suggests (``.vhd``/``.avhd`` → vhd, ...), else None."""
    for d in drivers():
        if d.name != "raw" and d.suffix_matches(path):
            return d.name
    return None


def image_titles() -> str:
    """'VHD, VDI or VHDX': for the "not an image" message."""
    titles = [d.title for d in drivers() if d.name != "raw"]
    return titles[0] if len(titles) == 1 else ", ".join(titles[:-1]) + " or " + titles[-1]
