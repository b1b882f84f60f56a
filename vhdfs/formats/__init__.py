"""Format layers: pure on-disk structures and parsing, one subpackage per format."""
