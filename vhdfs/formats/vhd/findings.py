"""What each VHD finding means for a user: error, leak or note (``vhdfs check`` exits 1 only
for errors).

The footer, layout and block checks word their findings as plain strings (each also refuses a
writable open); this is the one table that sorts them, so the severity of a message is decided
in one place and tested against every message the VHD code can make.

- error: damage that loses or hides data, or that makes another reader see something else
  (a footer or header whose checksum fails, copies that disagree, blocks that overlap);
- leak: space nothing uses;
- note: a harmless habit of a real writer, or damage to something every reader ignores
  (padding after the footer, a broken blktap batmap, an unusable spare parent locator).
"""

from __future__ import annotations

from ...block.driver import Finding, error, note

# substrings of findings that are notes; everything else is an error
_NOTES = (
    "bytes of trailing data after the footer",  # copy tools pad files
    "batmap",  # blktap's optional map: ignored when bad
    "has an invalid data space",  # a spare locator; the parent is found
    "lies outside the file",  # ... by another locator or by name
    "; ignored",
    "bitmap bits set past the virtual end",  # Disk2vhd, mkimg, blktap, XO
)


def classify(text: str) -> Finding:
    if "parent locator" in text or any(n in text for n in _NOTES):
        if text.startswith("BAT entr"):
            return error(text)
        return note(text)
    return error(text)
