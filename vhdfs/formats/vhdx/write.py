"""Writing VHDX (placeholder until the write path lands)."""

from __future__ import annotations

from ...errors import UnsupportedError


class VhdxWriter:
    def _init_writer(self) -> None:
        pass

    def _write(self, offset: int, data: memoryview) -> None:
        raise UnsupportedError("writing VHDX is not supported yet", self.path)  # type: ignore[attr-defined]


def open_writable(path, f, layout, plan, size):
    raise UnsupportedError("writing VHDX is not supported yet", path)
