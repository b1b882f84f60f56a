"""On-disk structures: fixed layouts, checksums, constants. Pure functions over bytes."""
