"""Async (trio) access to images, shared by every front end; no pyfuse3 here."""
