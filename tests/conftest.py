"""Fixtures shared by every tier: the corpus of real images, root/FUSE gates, scratch files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

# The suite gates every landing, so its property tests run the same examples each time: a red
# run is then reproducible and never luck. VHDFS_HYPOTHESIS_RANDOM=1 (and tools/soak.sh, which
# runs the fuzzers far longer) explores fresh examples instead.
settings.register_profile("suite", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("explore" if os.environ.get("VHDFS_HYPOTHESIS_RANDOM") else "suite")

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("VHDFS_CORPUS", REPO.parent / "shared" / "corpus"))


def corpus_entries() -> list[dict]:
    """Manifest entries (empty when the corpus is absent, so parametrised tests skip)."""
    manifest = CORPUS / "manifest.json"
    if not manifest.is_file():
        return []
    return json.loads(manifest.read_text())["images"]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch copy of the corpus with every image decompressed (read-only files).

    Tests that write must copy an image out of here first.
    """
    entries = corpus_entries()
    if not entries:
        pytest.skip(f"corpus not found at {CORPUS}")
    from images.corpus import unpack_corpus
    out = unpack_corpus(CORPUS, tmp_path_factory.mktemp("corpus"), read_only=True)
    assert out is not None
    return out


def corpus_ids() -> list[str]:
    return [e["image"] for e in corpus_entries()]


def has_root_fuse() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


needs_root = pytest.mark.skipif(not has_root_fuse(), reason="needs root, /dev/fuse and fusermount3")


@pytest.fixture
def thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every function ``vhdfs.aio.image`` hands to a worker thread (``trio.to_thread.run_sync``)."""
    from vhdfs.aio import image as aio_image

    hops: list[object] = []
    real = aio_image.trio.to_thread.run_sync

    async def counting(fn, *args, **kw):  # type: ignore[no-untyped-def]
        hops.append(fn)
        return await real(fn, *args, **kw)

    monkeypatch.setattr(aio_image.trio.to_thread, "run_sync", counting)
    return hops
