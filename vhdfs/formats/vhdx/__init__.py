"""VHDX ([MS-VHDX] v2), the pure layer: ``spec``/``logspec`` structures, ``log`` replay
planning, ``layout`` open-time parsing. No Image class and no registration here yet."""
