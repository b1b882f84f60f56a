"""The block layer: synchronous drivers for VHD (fixed, dynamic, differencing) and VDI.

A library of its own: it imports neither trio nor pyfuse3, so scripts can use it directly::

    from vhdfs.block import open_image
    with open_image("disk.vhd") as img:
        mbr = img.read(0, 512)
"""

from .chain import open_image, probe_format
from .image import Extent, Image, Kind, OpenOptions, ParentRef

__all__ = ["Extent", "Image", "Kind", "OpenOptions", "ParentRef", "open_image", "probe_format"]
