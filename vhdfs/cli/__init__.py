"""The ``vhdfs`` command: one subcommand per module, one place that turns errors into exits.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func=run`` where ``run(args) -> int``. Users see ``vhdfs: <file>: <what>`` and the exit code
of the error's class; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import UsageError, VhdfsError
from ..service import startup

if TYPE_CHECKING:
    from ..block.image import Image
    from ..service.snapshot import Snapshot

# Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("info", "create", "check", "mount", "umount", "serve", "convert", "commit", "resize", "compact")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only``, just that subcommand (the others' modules stay unimported)."""
    parser = argparse.ArgumentParser(
        prog="vhdfs",
        description="Expose VHD and VDI virtual-disk images (and differencing chains) as flat raw files.",
    )
    parser.add_argument("--version", action="version", version=f"vhdfs {__version__}")
    parser.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def _command_named(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (the first word that is not an option), if it is one.

    Only that command's module is then imported: the daemon (``mount -f``) starts without
    importing create, convert, commit and their block-layer modules. With no word and no
    ``--help`` (``vhdfs --version``, a bare ``vhdfs``) that is none of them: "" (the whole
    parser, every module and so every format, only to print a version took most of its time).
    """
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None if any(arg in ("-h", "--help") for arg in argv) else ""


def main(argv: list[str] | None = None) -> int:
    startup.pause()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=_command_named(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "resume_gc_when_serving", False):
        startup.resume()  # a command that runs to its end; a daemon resumes once it serves
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="vhdfs: %(levelname)s: %(message)s"
    )
    return reporting(args, lambda: args.func(args))


def reporting(args: argparse.Namespace, func: Callable[[], int | None]) -> int:
    """``func()``'s exit code, its error as one ``vhdfs:`` line and that error's exit code.

    ``main`` runs every command through it, and a forked daemon (``mount``) its serving.
    """
    try:
        return int(func() or 0)
    except VhdfsError as exc:
        if args.debug:
            raise
        print(f"vhdfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # ``vhdfs info | head``: the reader left; say nothing, like any Unix filter.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("vhdfs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        # Every line names a file: the one the error carries, else the image the command read.
        name = exc.filename or _image_argument(args)
        where = f"{os.fsdecode(name)}: " if name else ""
        print(f"vhdfs: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def _image_argument(args: argparse.Namespace) -> str | None:
    """The image a command was given (``IMAGE``, ``CHILD``, ``SRC``, a single mount image)."""
    for name in ("image", "child", "src"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            return value
    paths = getattr(args, "paths", None)
    return paths[0] if isinstance(paths, list) and len(paths) == 2 else None


def add_export_options(parser: argparse.ArgumentParser, rw_help: str, partitions_help: str) -> None:
    """Options of the commands that serve images to a front end (``mount``, ``serve``)."""
    from ..block.driver import format_names

    parser.add_argument("-w", "--rw", action="store_true", help=rw_help)
    parser.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground (systemd, debugging)"
    )
    parser.add_argument("--no-partitions", action="store_true", help=partitions_help)
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="writes go to a new differencing child; the image itself never changes",
    )
    parser.add_argument("--keep", metavar="CHILD", help="with --snapshot: keep the child at this path")
    parser.add_argument(
        "--format",
        choices=("auto", *format_names()),
        default="auto",
        help="image format (default: probe); raw exposes a plain disk file",
    )
    parser.add_argument("--force", action="store_true", help="open images with bad checksums for writing")
    add_image_options(parser)


def add_image_options(parser: argparse.ArgumentParser) -> None:
    """Options every command that opens an image shares, each format's own ones included."""
    from ..block.driver import drivers

    parser.add_argument(
        "--parent-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder to search for parent images (repeatable)",
    )
    for d in drivers():
        for opt in d.options:
            parser.add_argument(
                opt.flag, dest=opt.name, choices=opt.choices, default=opt.default, help=opt.help
            )
    parser.add_argument(
        "--ignore-parent-id",
        action="store_true",
        help="accept a parent whose UUID does not match the child's record",
    )


def driver_options(args: argparse.Namespace) -> dict[str, str]:
    """The format options of ``add_image_options`` as ``open_image`` keywords."""
    from ..block.driver import drivers

    return {o.name: getattr(args, o.name) for d in drivers() for o in d.options if hasattr(args, o.name)}


def snapshot_from_args(args: argparse.Namespace, base: Image, parent_dirs: Sequence[str]) -> Snapshot:
    """``--snapshot``: the differencing child over ``base``, opened with the command's options."""
    from ..service.snapshot import create_snapshot

    return create_snapshot(
        base,
        keep=args.keep,
        parent_dirs=parent_dirs,
        force=args.force,
        ignore_parent_id=args.ignore_parent_id,
        **driver_options(args),
    )


def open_from_args(
    args: argparse.Namespace,
    path: str,
    writable: bool = False,
    *,
    format: str | None = None,
    parent_dirs: Sequence[str] = (),
) -> Image:
    """``open_image`` with the shared options of ``add_image_options``."""
    from ..block import open_image

    return open_image(
        path,
        writable,
        parent_dirs=[*parent_dirs, *getattr(args, "parent_dir", ())],
        force=getattr(args, "force", False),
        format=format,
        ignore_parent_id=getattr(args, "ignore_parent_id", False),
        **driver_options(args),
    )


__all__ = ["UsageError", "add_image_options", "driver_options", "main", "open_from_args", "reporting"]
