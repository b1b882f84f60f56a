"""The nbdkit Python plugin: ``nbdkit python vhdfs/nbd/plugin.py image=disk.vhd [...]``.

nbdkit serves; this file only maps its callbacks (API_VERSION 2) onto ``backend.Server`` and
``backend.Handle`` and turns exceptions into errnos. Parameters: ``image=PATH`` (repeatable;
``name=STEM`` after one renames its exports), ``writable=1``, ``parent_dir=DIR``
(repeatable), ``format=``, ``force=1``, ``ignore_parent_id=1``, ``partitions=0``, format
options such as ``size_rule=chs``, ``verdict=FILE``, ``commit_interval=SECONDS``. ``vhdfs serve``
writes them for you, with ``PYTHONPATH`` set so that nbdkit's embedded Python finds vhdfs.

Exports: one per image, named by its stem (the first is the default export), and one per
partition, ``<stem>-p<N>``. Thread model PARALLEL: see ``backend``'s docstring for why the block
layer's write rule makes that safe.
"""

import functools
import logging
import sys

import nbdkit  # provided by nbdkit's embedded interpreter

from vhdfs.nbd.backend import Config, Server, errno_of

API_VERSION = 2

_config = Config()
_server = None  # set at get_ready: one Server (one Image per file) for every connection

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="vhdfs-nbd: %(levelname)s: %(message)s")


def _errors(fn):
    """Report an exception to nbdkit as its errno, then re-raise it (nbdkit logs it)."""

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except Exception as exc:
            nbdkit.set_error(errno_of(exc))
            raise

    return wrapper


# -- life of the server -----------------------------------------------------------------------


@_errors
def config(key, value):
    _config.apply(key, value)


@_errors
def config_complete():
    _config.check()


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def _ready() -> Server:
    """The server ``get_ready`` made (nbdkit calls nothing else before it)."""
    assert _server is not None
    return _server


@_errors
def get_ready():
    global _server
    _server = Server(_config)


def after_fork():
    _ready().start_committer()


def cleanup():
    if _server is not None and not _server.close():
        nbdkit.debug("vhdfs: some image did not flush and close cleanly")


def list_exports(readonly, is_tls):
    return _ready().list_exports()


def default_export(readonly, is_tls):
    return _ready().default_export


# -- connections ------------------------------------------------------------------------------


@_errors
def open(readonly):
    return _ready().connect(nbdkit.export_name(), readonly)


def export_description(h):
    return _ready().describe(h.window)


def get_size(h):
    return h.size


def is_rotational(h):
    return False


def can_write(h):
    return not h.readonly


def can_flush(h):
    return True


def can_trim(h):
    return not h.readonly


def can_zero(h):
    return not h.readonly


def can_fast_zero(h):
    return False


def can_fua(h):
    return nbdkit.FUA_NONE if h.readonly else nbdkit.FUA_NATIVE


def can_extents(h):
    return True


def can_multi_conn(h):
    # One Image per file for all connections: a flush on any of them covers every
    # connection's completed writes, so multi-conn holds for writable exports too.
    return True


# -- requests ---------------------------------------------------------------------------------


@_errors
def pread(h, buf, offset, flags):
    h.pread(buf, offset)


@_errors
def pwrite(h, buf, offset, flags):
    h.pwrite(buf, offset, bool(flags & nbdkit.FLAG_FUA))


@_errors
def flush(h, flags):
    h.flush()


@_errors
def trim(h, count, offset, flags):
    h.trim(count, offset, bool(flags & nbdkit.FLAG_FUA))


@_errors
def zero(h, count, offset, flags):
    h.zero(count, offset, bool(flags & nbdkit.FLAG_MAY_TRIM), bool(flags & nbdkit.FLAG_FUA))


@_errors
def extents(h, count, offset, flags):
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    return [
        (off, length, hole if is_zero else 0)
        for off, length, is_zero in h.extents(count, offset, bool(flags & nbdkit.FLAG_REQ_ONE))
    ]
