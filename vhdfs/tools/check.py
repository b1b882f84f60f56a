"""Checking an open image and its chain without changing a byte: findings with a severity.

Every layer's driver reports its own structural problems (footers, headers, tables, bitmaps);
this adds what only the chain can tell (parent identity; a parent of another size, as a note),
and walks each layer's whole allocation map so that a table pointing past the end of the file
is found here rather than at the first read of a mount.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..block.driver import Finding, Severity, error, note
from ..block.extent import Kind
from ..block.image import Image
from ..errors import VhdfsError


@dataclass(frozen=True)
class LayerFinding:
    path: str
    finding: Finding

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "problem": self.finding.text, "severity": self.finding.severity.value}


def _map_problems(layer: Image) -> list[Finding]:
    """Walk the layer's whole map: every DATA extent must lie inside the file."""
    try:
        # the open file's size: a block device's comes from the device (its st_size is 0)
        file_size = layer.file.size() if layer.file is not None else os.path.getsize(layer.path)
        for ext in layer.map_layer(0, layer.size):
            if ext.kind == Kind.DATA and ext.file_offset + ext.length > file_size:
                return [
                    error(
                        f"data for virtual offset {ext.offset} lies past the end of the file "
                        f"({ext.file_offset + ext.length} > {file_size})"
                    )
                ]
    except VhdfsError as exc:
        return [error(exc.message)]
    return []


def check_image(img: Image) -> list[LayerFinding]:
    """Findings for every layer of an open chain, top first."""
    out: list[LayerFinding] = []
    chain = img.chain
    for depth, layer in enumerate(chain):
        found: list[Finding] = []
        try:
            found.extend(layer.check())
        except VhdfsError as exc:
            found.append(error(exc.message))
        texts = {f.text for f in found}
        found.extend(f for f in _map_problems(layer) if f.text not in texts)
        if depth + 1 < len(chain):
            parent = chain[depth + 1]
            ref = layer.parent_ref
            if ref is not None and not ref.matches(parent):
                found.append(
                    error(
                        f"parent {parent.path} has id {parent.identity()}, "
                        f"the child expects {ref.expected_id}"
                    )
                )
            if parent.size != layer.size:  # allowed (a resized child): say how it reads
                tail = (
                    "reads as zeros past its end" if parent.size < layer.size else "counts to the child's end"
                )
                found.append(
                    note(f"parent {parent.path} is {parent.size} bytes, the child {layer.size}: {tail}")
                )
        out.extend(LayerFinding(layer.path, f) for f in found)
    return out


def count(findings: list[LayerFinding], severity: Severity) -> int:
    return sum(1 for f in findings if f.finding.severity is severity)
