"""Rows, cells, the text table with ratio columns, the target checks and the JSON dump."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field


@dataclass
class Row:
    key: str
    label: str
    unit: str            # "MB/s" | "IOPS" | "s" | "MiB"
    higher_better: bool = True


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    note: str | None = None      # "n/a: ..." or "FAILED: ..." when there are no values
    flags: list[str] = field(default_factory=list)   # footnotes (e.g. "first 64 MiB")

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def spread(self) -> float | None:
        """Half the min-max range, as a fraction of the median."""
        if len(self.values) < 2 or not self.median:
            return None
        return (max(self.values) - min(self.values)) / 2 / self.median

    def as_json(self) -> dict:
        return {"median": self.median, "spread": self.spread, "runs": self.values,
                "note": self.note, "flags": self.flags}


ROWS = [
    Row("seq_dd_warm", "seq read 1M, dd, dyn VHD, warm", "MB/s"),
    Row("seq_dd_cold", "seq read 1M, dd, dyn VHD, cold", "MB/s"),
    Row("seq_ddd_warm", "seq read 1M, dd iflag=direct, warm", "MB/s"),
    Row("seq_ddd_cold", "seq read 1M, dd iflag=direct, cold", "MB/s"),
    Row("seq_fixed_warm", "seq read 1M, dd, fixed VHD, warm", "MB/s"),
    Row("seq_diff1_warm", "seq read 1M, dd, diff depth 1, warm", "MB/s"),
    Row("seq_diff8_warm", "seq read 1M, dd, diff depth 8, warm", "MB/s"),
    Row("seq_vdi_warm", "seq read 1M, dd, VDI, warm", "MB/s"),
    Row("rr_qd1_warm", "rand read 4K QD1, fio, warm", "IOPS"),
    Row("rr_qd1_cold", "rand read 4K QD1, fio, cold", "IOPS"),
    Row("rr_qd16_warm", "rand read 4K QD16, fio, warm", "IOPS"),
    Row("rr_qd16_cold", "rand read 4K QD16, fio, cold", "IOPS"),
    Row("sw_new", "seq write 1M into new dyn VHD +fsync", "MB/s"),
    Row("sw_child", "seq write 1M into new diff child +fsync", "MB/s"),
    Row("rw_fsync64", "rand write 4K, fdatasync/64, dyn VHD", "IOPS"),
    Row("fs_write", "ext4 on loop: mkfs+untar 5k files+sync", "s", False),
    Row("fs_read", "ext4 on loop: tar 5k files back, cold", "s", False),
    Row("sparse_mount", "2040 GiB sparse VHD: launch -> file visible", "s", False),
    Row("sparse_ttfb", "2040 GiB sparse VHD: launch -> first 4K read", "s", False),
    Row("sparse_rss", "2040 GiB sparse VHD: daemon RSS", "MiB", False),
    # VHDX beside the dynamic VHD rows (issue 10): vhdfs's dyn.vhdx (32 MiB blocks), qemu-img's
    # qdyn.vhdx, a differencing child dx1.vhdx
    Row("xr_seq_warm", "dyn VHD beside the VHDX rows: seq read 1M, warm", "MB/s"),
    Row("xr_seq_cold", "dyn VHD beside the VHDX rows: seq read 1M, cold", "MB/s"),
    Row("xr_rr_qd1_warm", "dyn VHD beside the VHDX rows: rand read 4K QD1, warm", "IOPS"),
    Row("xr_rr_qd16_cold", "dyn VHD beside the VHDX rows: rand read 4K QD16, cold", "IOPS"),
    Row("xrd_seq_warm", "diff VHD depth 1 beside the VHDX rows: seq read 1M, warm", "MB/s"),
    Row("xrd_seq_cold", "diff VHD depth 1 beside the VHDX rows: seq read 1M, cold", "MB/s"),
    Row("xrd_rr_qd1_warm", "diff VHD depth 1 beside the VHDX rows: rand read 4K QD1, warm", "IOPS"),
    Row("xrd_rr_qd16_cold", "diff VHD depth 1 beside the VHDX rows: rand read 4K QD16, cold", "IOPS"),
    Row("x_seq_warm", "VHDX dyn (vhdfs): seq read 1M, warm", "MB/s"),
    Row("x_seq_cold", "VHDX dyn (vhdfs): seq read 1M, cold", "MB/s"),
    Row("x_rr_qd1_warm", "VHDX dyn (vhdfs): rand read 4K QD1, warm", "IOPS"),
    Row("x_rr_qd16_cold", "VHDX dyn (vhdfs): rand read 4K QD16, cold", "IOPS"),
    Row("xq_seq_warm", "VHDX dyn (qemu-img): seq read 1M, warm", "MB/s"),
    Row("xq_seq_cold", "VHDX dyn (qemu-img): seq read 1M, cold", "MB/s"),
    Row("xq_rr_qd1_warm", "VHDX dyn (qemu-img): rand read 4K QD1, warm", "IOPS"),
    Row("xq_rr_qd16_cold", "VHDX dyn (qemu-img): rand read 4K QD16, cold", "IOPS"),
    Row("xd_seq_warm", "VHDX diff depth 1: seq read 1M, warm", "MB/s"),
    Row("xd_seq_cold", "VHDX diff depth 1: seq read 1M, cold", "MB/s"),
    Row("xd_rr_qd1_warm", "VHDX diff depth 1: rand read 4K QD1, warm", "IOPS"),
    Row("xd_rr_qd16_cold", "VHDX diff depth 1: rand read 4K QD16, cold", "IOPS"),
    Row("x_sw_new", "seq write 1M into new dyn VHDX +fsync", "MB/s"),
    Row("x_sw_child", "seq write 1M into new diff VHDX +fsync", "MB/s"),
    Row("x_rw_fsync64", "rand write 4K, fdatasync/64, dyn VHDX", "IOPS"),
    Row("sparsex_ttfb", "64 TiB sparse VHDX 32M blocks: launch -> 4K read", "s", False),
    Row("sparsex_rss", "64 TiB sparse VHDX 32M blocks: daemon RSS", "MiB", False),
    Row("sparsex1m_ttfb", "64 TiB sparse VHDX 1M blocks: launch -> 4K read", "s", False),
    Row("sparsex1m_rss", "64 TiB sparse VHDX 1M blocks: daemon RSS", "MiB", False),
    # the user's own tools, default options (issue 14): a 512 MiB GPT disk made by qemu-img,
    # sfdisk, mke2fs -d (/usr/share/doc) and mkntfs + ntfs-3g (/usr/lib/python3), as a dyn VHD
    *[Row(f"u_{t}_{c}", f"user disk: {lbl}, {c}", "s", False)
      for t, lbl in (("sha256", "sha256sum whole disk"), ("cp", "cp whole disk to tmpfs"),
                     ("dd4k", "dd bs=4k whole disk"), ("dd1m", "dd bs=1M whole disk"))
      for c in ("cold", "warm")],
    *[Row(f"u_{t}_{c}", f"user disk: ext4 on loop, {t}, {c}", "s", False)
      for t in ("tar", "find", "grep") for c in ("cold", "warm")],
    Row("u_fls_cold", "user disk: TSK fls -r of NTFS, cold", "s", False),
    Row("u_icat_cold", "user disk: TSK icat NTFS $MFT, cold", "s", False),
    Row("u_tsk_recover_cold", "user disk: TSK tsk_recover -e NTFS, cold", "s", False),
    Row("u_ntfs3g_cold", "user disk: ntfs-3g mount + tar NTFS, cold", "s", False),
]
ROW = {r.key: r for r in ROWS}

# (column key, header) of the systems, in table order
SYSTEM_COLUMNS = [("bare", "bare"), ("pt", "pyfuse3"), ("pt-cache", "pyfuse3-c"),
                  ("vhdfs", "vhdfs"), ("qsd", "qsd"), ("vhdimount", "vhdimount")]
# ratio columns: (header, peer column); vhdfs is always its default mode (the only one measured)
RATIO_COLUMNS = [("v/pyf", "pt"), ("v/pyfc", "pt-cache"), ("v/qsd", "qsd"), ("v/vhdi", "vhdimount"),
                 ("v/bare", "bare")]


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "MB/s":
        return f"{v / 1000:.2f}G" if v >= 1000 else f"{v:.0f}M"
    if unit == "IOPS":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    if unit == "s":
        return f"{v * 1000:.0f}ms" if v < 10 else f"{v:.1f}s"
    if unit == "MiB":
        return f"{v:.0f}M"
    return f"{v:.3g}"


def fmt_cell(c: Cell | None, unit: str, notes: dict[str, int]) -> str:
    if c is None:
        return "-"
    if c.median is None:
        text = c.note or "n/a"
        if text not in notes:
            notes[text] = len(notes) + 1
        return f"n/a[{notes[text]}]" if not text.startswith("FAILED") else f"FAIL[{notes[text]}]"
    s = fmt_value(c.median, unit)
    if c.spread is not None:
        s += f"±{c.spread * 100:.0f}%"
    for fl in c.flags:
        if fl not in notes:
            notes[fl] = len(notes) + 1
        s += f"[{notes[fl]}]"
    return s


def goodness(row: Row, v: float | None) -> float | None:
    if v is None or v <= 0:
        return None
    return v if row.higher_better else 1.0 / v


def ratio(row: Row, cells: dict[str, Cell], peer: str) -> float | None:
    """vhdfs over peer as "how many times better" (time/RSS rows: peer / vhdfs)."""
    g = goodness(row, cells["vhdfs"].median) if "vhdfs" in cells else None
    p = goodness(row, cells[peer].median) if peer in cells else None
    if g is None or p is None:
        return None
    return g / p


def table(results: dict[str, dict[str, Cell]], header: list[str]) -> str:
    notes: dict[str, int] = {}
    cols = ["workload"] + [h for _, h in SYSTEM_COLUMNS] + [h for h, _ in RATIO_COLUMNS]
    lines = []
    for row in ROWS:
        cells = results.get(row.key, {})
        line = [f"{row.label} ({row.unit})"]
        line += [fmt_cell(cells.get(k), row.unit, notes) for k, _ in SYSTEM_COLUMNS]
        for _, peer in RATIO_COLUMNS:
            r = ratio(row, cells, peer)
            line.append("-" if r is None else f"{r:.2f}")
        lines.append(line)
    widths = [max(len(x[i]) for x in lines + [cols]) for i in range(len(cols))]
    out = list(header)
    out.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                         for i, c in enumerate(cols)))
    out.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for line in lines:
        out.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                             for i, c in enumerate(line)))
    out.append("")
    out.append("Cells: median of the runs ± half their min-max range. Ratios: how many times better "
               "vhdfs is (time/RSS rows: peer ÷ vhdfs); v = vhdfs with default options (the kernel "
               "page cache, keep_cache), against pyfuse3 in direct_io (pyf) and keep_cache (pyfc) mode.")
    for text, n in notes.items():
        out.append(f"[{n}] {text}")
    return "\n".join(out)


# -- targets ---------------------------------------------------------------------------------

def _m(results, row, key):
    c = results.get(row, {}).get(key)
    return c.median if c else None


def targets(results: dict[str, dict[str, Cell]]) -> list[dict]:
    out = []

    def check(name: str, value: float | None, bound: float, how: str, detail: str = "",
              lower: bool = False) -> None:
        if value is None:
            status = "n/a"
        else:
            ok = value < bound if lower else value >= bound
            status = "holds" if ok else "MISSED"
        out.append({"target": name, "value": value, "bound": bound, "status": status,
                    "how": how, "detail": detail})

    def ratio_of(row, peer):
        return ratio(ROW[row], results.get(row, {}), peer)

    check("seq read dyn VHD warm >= 0.9x pyfuse3 ceiling (keep_cache)",
          ratio_of("seq_dd_warm", "pt-cache"), 0.9, "ratio")
    check("seq read dyn VHD warm >= 1.0x qemu-storage-daemon", ratio_of("seq_dd_warm", "qsd"), 1.0, "ratio")
    check("seq read dyn VHD warm >= 3x vhdimount", ratio_of("seq_dd_warm", "vhdimount"), 3.0, "ratio")
    d1, d8 = _m(results, "seq_diff1_warm", "vhdfs"), _m(results, "seq_diff8_warm", "vhdfs")
    check("seq read diff depth 8 >= 0.7x depth 1 (vhdfs default)",
          d8 / d1 if d1 and d8 else None, 0.7, "ratio")
    check("rand read 4K QD16 warm >= 1.0x qemu-storage-daemon", ratio_of("rr_qd16_warm", "qsd"), 1.0, "ratio")
    check("seq write new dyn VHD >= 0.7x pyfuse3 ceiling's write (keep_cache)",
          ratio_of("sw_new", "pt-cache"), 0.7, "ratio")
    check("seq write new dyn VHD >= 1.0x qemu-storage-daemon writable", ratio_of("sw_new", "qsd"), 1.0, "ratio")
    check("2040 GiB sparse VHD mounted and readable < 0.3 s (vhdfs default, launch -> 4K read)",
          _m(results, "sparse_ttfb", "vhdfs"), 0.3, "s", lower=True)
    check("2040 GiB sparse VHD daemon RSS < 60 MiB (vhdfs default)",
          _m(results, "sparse_rss", "vhdfs"), 60.0, "MiB", lower=True)
    # issue 10: VHDX >= 0.9x the same workload on the dynamic VHD, vhdfs default options (read
    # rows: against the dyn VHD mounted beside them, xr_*, runs alternated)
    for xrow, vrow, what in (
            ("x_seq_warm", "xr_seq_warm", "seq read warm"), ("x_seq_cold", "xr_seq_cold", "seq read cold"),
            ("x_rr_qd1_warm", "xr_rr_qd1_warm", "rand read 4K QD1 warm"),
            ("x_rr_qd16_cold", "xr_rr_qd16_cold", "rand read 4K QD16 cold"),
            ("xq_seq_warm", "xr_seq_warm", "qemu-img VHDX seq read warm"),
            ("xd_seq_warm", "xr_seq_warm", "diff VHDX seq read warm"),
            ("xd_rr_qd16_cold", "xr_rr_qd16_cold", "diff VHDX rand read 4K QD16 cold"),
            ("xd_seq_cold", "xrd_seq_cold", "diff VHDX seq read cold"),
            ("xd_rr_qd1_warm", "xrd_rr_qd1_warm", "diff VHDX rand read 4K QD1 warm"),
            ("x_sw_new", "sw_new", "seq write new"), ("x_sw_child", "sw_new", "seq write diff child"),
            ("x_rw_fsync64", "rw_fsync64", "rand write 4K fdatasync/64")):
        x, v = _m(results, xrow, "vhdfs"), _m(results, vrow, "vhdfs")
        ref = "diff VHD depth 1" if vrow.startswith("xrd") else "dyn VHD"
        check(f"VHDX {what} >= 0.9x {ref} (vhdfs default)", x / v if x and v else None,
              0.9, "ratio")
    for key, bs in (("sparsex", "32 MiB"), ("sparsex1m", "1 MiB")):
        check(f"64 TiB sparse VHDX ({bs} blocks) readable < 0.3 s (vhdfs default, launch -> 4K read)",
              _m(results, f"{key}_ttfb", "vhdfs"), 0.3, "s", lower=True)
        check(f"64 TiB sparse VHDX ({bs} blocks) daemon RSS < 60 MiB (vhdfs default)",
              _m(results, f"{key}_rss", "vhdfs"), 60.0, "MiB", lower=True)
    # issue 14: the user's own tools, default options, >= 1.0x qemu-storage-daemon
    for row in ROWS:
        if row.key.startswith("u_"):
            check(f"{row.label[len('user disk: '):]} >= 1.0x qsd (vhdfs default)",
                  ratio_of(row.key, "qsd"), 1.0, "ratio")
    return out


def targets_text(ts: list[dict]) -> str:
    lines = ["Targets:"]
    for t in ts:
        v = t["value"]
        if v is None:
            val = "no figure"
        elif t["how"] == "ratio":
            val = f"{v:.2f}x"
        elif t["how"] == "s":
            val = f"{v * 1000:.0f} ms"
        else:
            val = f"{v:.1f} {t['how']}"
        extra = f" ({t['detail']})" if t["detail"] and v is not None else ""
        lines.append(f"  [{t['status']:>6}] {t['target']}: {val}{extra}")
    return "\n".join(lines)


def dump_json(path: str, meta: dict, results: dict[str, dict[str, Cell]], ts: list[dict],
              text: str) -> None:
    doc = {
        "meta": meta,
        "rows": [{"key": r.key, "label": r.label, "unit": r.unit, "higher_better": r.higher_better,
                  "cells": {k: c.as_json() for k, c in results.get(r.key, {}).items()},
                  "ratios": {h: ratio(r, results.get(r.key, {}), p) for h, p in RATIO_COLUMNS}}
                 for r in ROWS],
        "targets": ts,
        "table": text,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def load_json(path: str) -> tuple[dict, dict[str, dict[str, Cell]]]:
    """Figures of an earlier ``--json`` run, to re-render the table without re-measuring."""
    with open(path) as f:
        doc = json.load(f)
    results = {r["key"]: {k: Cell(values=c["runs"], note=c["note"], flags=c["flags"])
                          for k, c in r["cells"].items()} for r in doc["rows"]}
    return doc["meta"], results


def json_header(path: str) -> list[str]:
    """The header lines of an earlier run's table (everything above the column titles)."""
    with open(path) as f:
        text = json.load(f)["table"]
    lines = text.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("workload"))
    return lines[:end]
