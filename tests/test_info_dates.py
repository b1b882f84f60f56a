"""``vhdfs info`` shows dates as ISO 8601 UTC (text), and keeps the number beside the ISO string
(JSON), for every layer of every corpus image; the manifest's decoded dates are the reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import corpus_entries
from mounting import vhdfs

VHD_EPOCH = 946684800
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.mark.parametrize("entry", [e for e in corpus_entries() if e.get("expected_raw")], ids=lambda e: e["image"])
def test_info_dates_are_iso_utc(entry: dict, corpus_dir: Path) -> None:
    path = corpus_dir / entry["image"]
    info = json.loads(vhdfs("info", "--json", path, timeout=30).stdout)
    text = vhdfs("info", path, timeout=30).stdout
    footer = entry.get("vhd_footer")
    if footer:
        assert info["timestamp"] == footer["timestamp_raw"] + VHD_EPOCH   # the number stays
        assert info["timestamp_iso"] == footer["timestamp"]
        assert f"timestamp: {footer['timestamp']}" in text.splitlines()
    else:   # VDI headers carry no date (VirtualBox keeps them in its .vbox XML)
        assert entry["format"] == "vdi" and not any("timestamp" in k for k in info)
    for layer in info["layers"]:
        for key, value in layer.items():
            if key.endswith("timestamp"):
                assert ISO.match(layer[f"{key}_iso"]), (key, layer[f"{key}_iso"])
                assert isinstance(value, int)
    for line in text.splitlines():
        if "timestamp:" in line:
            assert ISO.match(line.split(": ", 1)[1]), line
    if "parent_timestamp" in info:
        assert "parent timestamp: " in text and "parent timestamp iso" not in text
