"""``position``: where each point really was, from interferometers and encoders.

At a nanoprobe the motor encoders are absolute but sit on the wrong side of
the mechanics (scale error, backlash, thermal drift), while the laser
interferometers watch the sample itself but now and then lose a reading.
Per axis this processor reports the interferometer reading where there is
one; where it is missing it maps the encoder reading through a calibration
learnt on the fly: a least-squares fit of

    interferometer = a + b encoder + c direction + d index

over every point of the scan this worker has seen with both readings
(``direction`` is the fast axis' sense of motion, which carries the backlash;
``index`` stands for time, which carries the drift). Until four points with
both readings have been seen it falls back to the raw encoder.

Settings: ``axes``: {axis name: {"encoder": "stream/array", "interferometer":
"stream/array"}}; either sensor may be left out (encoder only: no
correction; interferometer only: NaN where it is lost). Results per point:
``<axis>`` (corrected, the sensors' units), ``<axis>_encoder_error``
(encoder minus corrected: the encoder's error map) and ``<axis>_source``
(0 interferometer, 1 calibrated encoder, 2 raw encoder, 3 none).
The sink uses ``<axis>`` to regrid maps onto the true positions.
"""

from __future__ import annotations

import numpy as np

from pipelines.processors import Batch, Processor

FROM_INTERFEROMETER, FROM_CALIBRATED_ENCODER, FROM_RAW_ENCODER, FROM_NOTHING = 0, 1, 2, 3
MIN_CALIBRATION_POINTS = 4


class Position(Processor):
    settings_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["axes"],
        "properties": {
            "axes": {"type": "object", "minProperties": 1, "additionalProperties": {
                "type": "object", "additionalProperties": False, "minProperties": 1,
                "properties": {"encoder": {"type": "string", "pattern": "^[^/]+/[^/]+$"},
                               "interferometer": {"type": "string", "pattern": "^[^/]+/[^/]+$"}}}},
        },
    }

    @classmethod
    def check_settings(cls, scan, settings) -> dict:
        settings = super().check_settings(scan, settings)
        used: dict[str, str] = {}
        for axis, sensors in settings["axes"].items():
            if sensors.get("encoder") is not None and sensors.get("encoder") == sensors.get("interferometer"):
                raise ValueError(f"axis {axis}: encoder and interferometer are the same array "
                                 f"{sensors['encoder']!r}: the calibration needs two sensors")
            for sensor in dict.fromkeys(sensors.values()):
                if sensor in used:
                    raise ValueError(f"{sensor!r} is a sensor of both axis {used[sensor]} and axis {axis}")
                used[sensor] = axis
        results = [name for axis in settings["axes"] for name in (axis, f"{axis}_encoder_error", f"{axis}_source")]
        clashes = sorted({r for r in results if results.count(r) > 1})
        if clashes:
            raise ValueError(f"axis names give the same result name twice: {clashes}")
        return settings

    def start_scan(self, scan, settings) -> None:
        super().start_scan(scan, settings)
        self.axes = self.settings["axes"]
        # running normal equations per axis: X^T X (4 x 4) and X^T y (4)
        self.normal = {a: (np.zeros((4, 4)), np.zeros(4)) for a in self.axes}
        self.seen = {a: 0 for a in self.axes}

    def _read(self, batch: Batch, name: str | None) -> np.ndarray | None:
        if name is None:
            return None
        arr = batch.arrays.get(name)
        if arr is None:
            stream = name.split("/", 1)[0]
            batch.stream(stream)  # KeyError naming a missing stream
            raise KeyError(f"no array {name!r} in these events")
        if arr.ndim != 1:
            raise ValueError(f"position {name!r} has shape {arr.shape[1:]} per point; positions are scalars")
        return arr.astype(np.float64, copy=False)

    def _direction(self, batch: Batch) -> np.ndarray:
        """The fast axis' sense of motion per point: -1 on a snake's odd rows."""
        meta = batch.scan
        if meta.geometry_type != "raster" or not meta.snake:
            return np.ones(batch.count)
        rows = batch.indices // meta.map_shape[1]
        return np.where(rows % 2 == 1, -1.0, 1.0)

    def process(self, batch: Batch) -> dict[str, np.ndarray]:
        direction = self._direction(batch)
        index = batch.indices / batch.scan.points  # time, scaled to keep the fit well conditioned
        out: dict[str, np.ndarray] = {}
        for axis, sensors in self.axes.items():
            encoder = self._read(batch, sensors.get("encoder"))
            interferometer = self._read(batch, sensors.get("interferometer"))
            corrected = np.full(batch.count, np.nan)
            source = np.full(batch.count, FROM_NOTHING, dtype=np.uint8)
            if interferometer is not None:
                ok = np.isfinite(interferometer)
                corrected[ok] = interferometer[ok]
                source[ok] = FROM_INTERFEROMETER
            if encoder is not None:
                design = np.stack([np.ones(batch.count), encoder, direction, index], axis=1)
                if interferometer is not None:
                    both = np.isfinite(interferometer) & np.isfinite(encoder)
                    xtx, xty = self.normal[axis]
                    xtx += design[both].T @ design[both]
                    xty += design[both].T @ interferometer[both]
                    self.seen[axis] += int(both.sum())
                lost = ~np.isfinite(corrected) & np.isfinite(encoder)
                if lost.any():
                    if self.seen[axis] >= MIN_CALIBRATION_POINTS:
                        coefficients = np.linalg.lstsq(self.normal[axis][0], self.normal[axis][1], rcond=None)[0]
                        corrected[lost] = design[lost] @ coefficients
                        source[lost] = FROM_CALIBRATED_ENCODER
                    else:
                        corrected[lost] = encoder[lost]
                        source[lost] = FROM_RAW_ENCODER
                out[f"{axis}_encoder_error"] = encoder - corrected
            out[axis] = corrected
            out[f"{axis}_source"] = source
        return out
