"""Async (trio) access to images, and who may use an export (``access``), shared by every front
end; no pyfuse3 here."""
