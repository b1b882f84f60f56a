"""vhdfs: virtual-disk images (VHD, VDI) exposed as flat raw files through FUSE."""

__version__ = "0.1.0"
