"""What front ends share besides I/O: mount state files, daemon spawning, snapshot children."""
