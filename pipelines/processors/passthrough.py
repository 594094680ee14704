"""``passthrough``: hand selected source arrays on unchanged (commissioning,
raw previews, and the reference path for throughput and latency benchmarks)."""

from __future__ import annotations

import numpy as np

from pipelines.processors import Batch, Processor


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
            }
        },
    }

    def process(self, batch: Batch) -> dict[str, np.ndarray]:
        names = self.settings.get("arrays")
        if names is None:
            return dict(batch.arrays)
        absent = [n for n in names if n not in batch.arrays]
        if absent:
            raise KeyError(f"arrays {absent} not in these events (have {sorted(batch.arrays)})")
        return {n: batch.arrays[n] for n in names}
