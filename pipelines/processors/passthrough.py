"""``passthrough``: hand selected source arrays on unchanged (commissioning,
raw previews, keeping raw frames, and the reference path for throughput and
latency benchmarks).

With ``keep_compressed``, frames that travel compressed (an EIGER's
bitshuffle-LZ4 chunks) are passed on as they came, never decompressed: the
NeXus writer then stores the detector's own chunks directly (HDF5 direct
chunk write), and the sink and the other writers decompress what they show."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.processors import Batch, Processor
from services.scan import ScanMeta


class Passthrough(Processor):
    settings_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "arrays": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[^/]+/.+$"},
                "uniqueItems": True,
                "minItems": 1,
                "description": "stream/array names to pass on; default (left out): every array of the batch",
            },
            "keep_compressed": {
                "type": "boolean",
                "description": "pass compressed frames on still compressed (default false: decompressed)",
            },
        },
    }

    def start_scan(self, scan: ScanMeta, settings: dict[str, Any]) -> None:
        super().start_scan(scan, settings)
        self.keeps_compressed = bool(self.settings.get("keep_compressed", False))

    def process(self, batch: Batch) -> dict[str, np.ndarray]:
        names = self.settings.get("arrays")
        if names is None:
            return dict(batch.arrays)
        absent = [n for n in names if n not in batch.arrays]
        if absent:
            raise KeyError(f"arrays {absent} not in these events (have {sorted(batch.arrays)})")
        return {n: batch.arrays[n] for n in names}
