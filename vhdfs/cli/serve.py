"""``vhdfs serve``: every image (and chain) as an NBD export, through nbdkit and the vhdfs plugin.

Like ``mount``: every image is opened here first (bad input is one line and an exit code,
nothing started), then, without ``-f``, the server is re-executed detached and this process
waits for its ``READY=1`` (nbdkit accepts connections) or its last error line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from ..errors import UsageError
from . import add_export_options, driver_options, snapshot_from_args

if TYPE_CHECKING:
    from ..block.image import Image
    from ..nbd.backend import Config
    from ..nbd.serve import Listen


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve images as NBD exports (nbdkit): block status, trim, many clients",
        usage="vhdfs serve [options] (--unix PATH | --port N [--bind ADDR]) IMAGE [IMAGE ...]",
        description="Serve each IMAGE as an NBD export named by its stem (the first is also the "
        "default export), each partition as <stem>-p<N>. Read-only unless -w. "
        "Clients: nbdinfo, nbdcopy, qemu-img, nbd-client, qemu-nbd -c.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="PATH", help="listen on this unix socket")
    where.add_argument("--port", type=int, metavar="N", help="listen on this TCP port")
    p.add_argument("--bind", metavar="ADDR", help="with --port: address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--tls-psk", metavar="FILE", help="require TLS with these pre-shared keys (nbdkit's psktool format)"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --bind without --tls-psk (anyone who reaches it reads the disk)",
    )
    p.add_argument("--pidfile", metavar="FILE", help="write the server's pid here once it serves")
    add_export_options(p, "allow writes, trim and zero", "do not export partitions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..nbd.serve import configure_logging, nbdkit_path

    listen = _listen(args)
    images = _check(args)
    nbdkit_path()
    config = _config(args, images)
    if args.foreground:
        configure_logging(args.debug)
        return _serve(args, config, listen)
    _validate(args, config)
    listen.prepare()
    return _spawn(args, listen)


def _listen(args: argparse.Namespace) -> Listen:
    from ..nbd.serve import Listen

    if args.bind and args.port is None:
        raise UsageError("--bind goes with --port")
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1-65535, not {args.port}")
    listen = Listen(
        unix=os.path.abspath(args.unix) if args.unix else None, port=args.port, bind=args.bind or "127.0.0.1"
    )
    if not listen.is_loopback() and not args.tls_psk and not args.insecure:
        raise UsageError(
            f"--bind {listen.bind} is reachable from the network: give --tls-psk FILE "
            "(or --insecure to serve without encryption or authentication)"
        )
    if args.tls_psk:
        if not os.path.isfile(args.tls_psk):
            raise UsageError("no such file", args.tls_psk)
        args.tls_psk = os.path.abspath(args.tls_psk)
    return listen


def _check(args: argparse.Namespace) -> list[str]:
    if args.keep and not args.snapshot:
        raise UsageError("--keep needs --snapshot")
    if args.snapshot and args.rw:
        raise UsageError("--snapshot already makes the exports writable; drop -w")
    images = [os.path.abspath(p) for p in args.images]
    if args.keep and len(images) > 1:
        raise UsageError("--keep names one child: use it with one image")
    if args.keep and os.path.exists(args.keep):
        raise UsageError("already exists; --keep will not overwrite a file", args.keep)
    return images


def _config(args: argparse.Namespace, images: list[str]) -> Config:
    from ..nbd.backend import Config

    config = Config(
        writable=args.rw,
        parent_dirs=[os.path.abspath(d) for d in args.parent_dir],
        force=args.force,
        ignore_parent_id=args.ignore_parent_id,
        format=None if args.format == "auto" else args.format,
        partitions=not args.no_partitions,
        options=driver_options(args),
    )
    config.images = [[p, None] for p in images]
    return config


def _validate(args: argparse.Namespace, config: Config) -> None:
    """Open every image as the plugin will, and lay out the exports; then close them again."""
    from ..block.exports import plan_exports
    from ..service.snapshot import check_can_snapshot

    opened = config.open_images()
    try:
        for ex in opened:
            if args.snapshot:
                check_can_snapshot(ex.image)
        plan_exports(opened, partitions=config.partitions)
    finally:
        for ex in opened:
            ex.image.close()


def _serve(args: argparse.Namespace, config: Config, listen: Listen) -> int:
    """The server itself (``-f``): snapshot children, then nbdkit until it stops."""
    from ..nbd.serve import run as serve
    from ..service.snapshot import stem

    _validate(args, config)
    named = [str(entry[0]) for entry in config.images]  # what the user named (not children)
    temp: list[str] = []
    if args.snapshot:
        try:
            for entry in config.images:
                base_path = str(entry[0])
                with config_image(config, base_path) as base:
                    snap = snapshot_from_args(args, base, config.parent_dirs)
                snap.image.close()  # the plugin opens it again, in nbdkit
                if snap.temp_child:
                    temp.append(snap.temp_child)
                entry[0], entry[1] = snap.image.path, stem(base_path)
                config.parent_dirs.append(os.path.dirname(base_path))
            config.writable = True
            config.format = None
        except BaseException:
            for path in temp:
                os.unlink(path)
            raise
    return serve(
        config,
        listen,
        tls_psk=args.tls_psk,
        verbose=args.debug,
        temp_children=temp,
        pidfile=os.path.abspath(args.pidfile) if args.pidfile else None,
        named=named,
    )


def config_image(config: Config, path: str) -> Image:
    """One image opened read-only with the config's options."""
    from ..block.chain import open_image

    return open_image(
        path,
        False,
        parent_dirs=config.parent_dirs,
        force=config.force,
        ignore_parent_id=config.ignore_parent_id,
        format=config.format,
        **config.options,
    )


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "vhdfs"]
    if args.debug:
        argv.append("--debug")
    argv += ["serve", "--foreground", "--format", args.format]
    for name, value in driver_options(args).items():
        argv += [_flag(name), value]
    for flag, on in (
        ("--rw", args.rw),
        ("--no-partitions", args.no_partitions),
        ("--snapshot", args.snapshot),
        ("--force", args.force),
        ("--ignore-parent-id", args.ignore_parent_id),
        ("--insecure", args.insecure),
    ):
        if on:
            argv.append(flag)
    for opt, value in (
        ("--keep", args.keep),
        ("--pidfile", args.pidfile),
        ("--unix", args.unix),
        ("--tls-psk", args.tls_psk),
    ):
        if value:
            argv += [opt, os.path.abspath(value)]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    if args.bind:
        argv += ["--bind", args.bind]
    for d in args.parent_dir:
        argv += ["--parent-dir", os.path.abspath(d)]
    return argv + ["--", *(os.path.abspath(p) for p in args.images)]


def _flag(option: str) -> str:
    from ..block.driver import drivers

    return next(o.flag for d in drivers() for o in d.options if o.name == option)


def _spawn(args: argparse.Namespace, listen: Listen) -> int:
    """Start the server detached; return once it accepts connections, printing its URI."""
    from ..service import state
    from ..service.snapshot import stem
    from ..service.spawn import spawn_daemon

    log_path = state.path_for_name("serve-" + listen.key, ".log")
    spawn_daemon(_child_argv(args), log_path, listen.key)
    record = state.path_for_name("serve-" + listen.key, ".json")
    pid = ""
    try:
        import json

        with open(record) as f:
            pid = f" (pid {json.load(f)['pid']})"
    except (OSError, ValueError, KeyError):
        pass
    print(f"{listen.uri(stem(args.images[0]), tls=bool(args.tls_psk))}{pid}")
    return 0
