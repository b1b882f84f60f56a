"""Open one VHD layer: find the footer, decide the virtual size, build the image.

``open_layer`` finds the footer (``footer.py``), decides the virtual size (QEMU 10's rule unless
``--size-rule`` overrides it), and hands dynamic and differencing disks to ``sparse.SparseVhd``.
It only ever reads, so a failed open leaves the file untouched; any low-level decoding error on
corrupt input is turned into a one-line ``FormatError``.
"""

from __future__ import annotations

from ...block.image import Image, OpenOptions
from ...block.rawfile import RawFile, open_layer_file
from ...errors import FormatError, UnsupportedError, warn
from . import spec as fmt
from .fixed import FixedVhd
from .footer import read_footer
from .layout import load_layout, parent_ref
from .sparse import SparseVhd

MAX_FINDINGS = 50


def open_layer(path: str, options: OpenOptions) -> Image:
    """Open one VHD layer (parents are attached by ``chain.attach_parents``)."""
    return open_layer_file(path, options.writable, "VHD", lambda f: _open(path, f, options))


def _open(path: str, f: RawFile, options: OpenOptions) -> Image:
    size = f.size()
    footer, footer_offset, where, findings = read_footer(f, size)
    repair = bool(findings)  # every finding so far is about the footer
    if footer.disk_type not in fmt.DISK_TYPE_NAMES:
        raise UnsupportedError(
            f"VHD disk type {footer.disk_type} is not supported (only fixed 2, dynamic 3, differencing 4)"
        )
    vsize, rule = fmt.virtual_size(footer, options.extra.get("size_rule", "auto"))
    if footer.disk_type == fmt.DISK_FIXED:
        if where != "tail":
            raise FormatError("fixed VHD without a footer at the end of the file")
        if rule != "chs" and vsize > footer_offset:
            # only a CHS size may exceed the data (QEMU 2012 wrote such files); a larger
            # current_size means the data area was cut short
            raise FormatError(
                f"fixed VHD claims {vsize} bytes but holds only {footer_offset} bytes of data (truncated?)"
            )
        image: Image = FixedVhd(path, f, footer, footer_offset, vsize, rule, findings, repair)
    else:
        if vsize > fmt.MAX_VIRTUAL_SIZE:
            raise FormatError(f"virtual size {vsize} exceeds the VHD maximum of 2040 GiB")
        layout = load_layout(f, footer, footer_offset, size, vsize)
        findings += layout.findings
        del findings[MAX_FINDINGS:]
        image = SparseVhd(path, f, footer, footer_offset, size, layout, vsize, rule, findings, where, repair)
        if footer.disk_type == fmt.DISK_DIFFERENCING:
            image.parent_ref = parent_ref(path, layout.header, layout.locators)
    if findings:
        if options.writable and not options.force:
            raise FormatError(f"{findings[0]}: refusing to open for writing (--force overrides this)")
        for finding in findings:
            warn(finding, f.path)
    if options.writable and footer.saved_state:
        warn("the image is marked 'saved state' by its hypervisor; writing may confuse it", f.path)
    return image
