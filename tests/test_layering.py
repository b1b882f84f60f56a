"""The block layer is a library of its own: importing it must not pull in trio or pyfuse3."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vhdfs import errors


def test_block_layer_imports_neither_trio_nor_pyfuse3() -> None:
    code = (
        "import sys, vhdfs.block, vhdfs.block.chain\n"
        "import importlib\n"
        "for m in ('vhdfs.block.vhd', 'vhdfs.block.vdi', 'vhdfs.block.vhd_create', 'vhdfs.block.vdi_create'):\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'pyfuse3'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("cls", [errors.VhdfsError, errors.FormatError, errors.UnsupportedError,
                                 errors.ChainError, errors.ReadOnlyError, errors.BusyError,
                                 errors.UsageError])
def test_every_error_has_one_errno_and_one_exit_code(cls: type[errors.VhdfsError]) -> None:
    exc = cls("something is wrong", "/tmp/x.vhd")
    assert isinstance(exc.errno, int) and exc.errno > 0
    assert isinstance(exc.exit_code, int) and exc.exit_code > 0
    assert str(exc) == "/tmp/x.vhd: something is wrong"
