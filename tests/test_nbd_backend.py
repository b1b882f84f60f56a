"""The NBD plugin's backend without nbdkit: parameters, windows, requests on a real image."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from vhdfs.block import open_image
from vhdfs.errors import ReadOnlyError, UsageError
from vhdfs.nbd.backend import Config, Server, errno_of
from vhdfs.tools.create import create_image

MiB = 1 << 20


def test_config_round_trips_through_nbdkit_parameters() -> None:
    c = Config(writable=True, parent_dirs=["/p"], force=True, format="vhd", partitions=False,
               options={"size_rule": "chs"}, verdict="/v.json", commit_interval=0.5)
    c.images = [["/a/disk.vhd", None], ["/tmp/snap.vhd", "base"]]
    back = Config()
    for arg in c.to_args():
        key, _, value = arg.partition("=")
        back.apply(key, value)
    assert back == c
    with pytest.raises(UsageError):
        Config().apply("name", "x")            # name= before any image=
    with pytest.raises(UsageError):
        Config().apply("bogus", "1")
    with pytest.raises(UsageError):
        Config().check()


def test_handle_requests_on_a_dynamic_vhd(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_image(str(path), format="vhd", type="dynamic", size=8 * MiB)
    c = Config(writable=True, commit_interval=0.1)
    c.apply("image", str(path))
    server = Server(c)
    try:
        assert server.default_export == "d" and [n for n, _ in server.list_exports()] == ["d"]
        h = server.connect("", readonly=False)
        assert server.connect("d.raw", readonly=True).readonly
        with pytest.raises(OSError) as e:
            server.connect("nope", readonly=True)
        assert e.value.errno == errno.ENOENT
        h.pwrite(memoryview(b"x" * 5000), 3 * MiB - 100)
        buf = bytearray(b"\xff" * 8192)
        h.pread(memoryview(buf), 3 * MiB - 1000)      # zeros filled in, not left as 0xff
        assert buf == bytes(900) + b"x" * 5000 + bytes(8192 - 5900)
        assert h.extents(8 * MiB, 0) == [(0, 2 * MiB, True), (2 * MiB, 2 * MiB, False), (4 * MiB, 4 * MiB, True)]
        assert h.extents(8 * MiB, 0, req_one=True) == [(0, 2 * MiB, True)]
        h.zero(10, 3 * MiB - 100)                     # no may_trim: zeros written over data
        assert server.connect("d", True).extents(10, 3 * MiB - 100) == [(3 * MiB - 100, 10, False)]  # still allocated
        chk = bytearray(20)
        h.pread(memoryview(chk), 3 * MiB - 105)
        assert chk == b"\0" * 5 + bytes(10) + b"x" * 5
        h.trim(2 * MiB, 2 * MiB)
        with pytest.raises(OSError):
            h.pread(memoryview(bytearray(10)), 8 * MiB - 5)
        ro = server.connect("d", readonly=True)
        with pytest.raises(ReadOnlyError) as e2:
            ro.pwrite(memoryview(b"no"), 0)
        assert errno_of(e2.value) == errno.EROFS
        h.flush()
    finally:
        assert server.close()
    with open_image(path) as img:
        assert img.read(0, 8 * MiB) == bytes(8 * MiB)      # the trim released the one block
        assert img.allocated_bytes() == 0
