"""The corpus of real images (../shared/corpus): unpacking it, copying one, its expected sums."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
from collections.abc import Collection
from pathlib import Path


def unpack_corpus(corpus: Path, out: Path, wanted: Collection[str] | None = None,
                  read_only: bool = False) -> Path | None:
    """Decompress the corpus images (all, or those named in ``wanted``) into ``out``.

    Keeps the relative layout, so differencing images find their parents. None when the
    corpus (its manifest.json) is absent.
    """
    manifest = corpus / "manifest.json"
    if not manifest.is_file():
        return None
    out.mkdir(parents=True, exist_ok=True)
    for entry in json.loads(manifest.read_text())["images"]:
        if wanted is not None and entry["image"] not in wanted:
            continue
        src, dst = corpus / entry["stored_as"], out / entry["image"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if entry.get("compression") == "xz":
            with lzma.open(src) as fin, open(dst, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        else:
            shutil.copyfile(src, dst)
        if read_only:
            dst.chmod(0o444)
    return out


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def corpus_copy(corpus: Path | None, d: Path, name: str) -> Path:
    assert corpus is not None
    dst = d / name
    shutil.copyfile(corpus / name, dst)
    dst.chmod(0o644)
    return dst


def corpus_sha256(name: str) -> str:
    from conftest import corpus_entries  # tests/ is on sys.path under pytest
    return next(e["expected_raw"]["sha256"] for e in corpus_entries() if e["image"] == name)
