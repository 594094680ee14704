"""``dpc``: differential phase contrast from the transmitted beam's centre of mass.

A phase gradient in the sample deflects the beam, which moves the
bright-field disc on a pixel detector in the far field. Per frame this
processor takes the centre of mass of the counts (vectorised over the batch:
two weighted sums per frame), subtracts the undeflected reference position
and turns the shift into the phase gradient,
``grad(phi) = shift / (distance x lambda / 2 pi)`` in rad/µm. The total counts
are the bright-field (absorption) signal. The sink integrates the two
gradients into a phase map (sink/phase.py).

Settings: ``detector`` (stream), ``image`` (array, default ``image``),
``shift_px_per_rad_per_um`` or the geometry (``distance_m``, ``wavelength_m``,
``pixel_size_m``), ``reference_px`` ([x, y], default the frame centre),
``normalise_by`` (monitor ``stream/array``). Results: ``com_x``, ``com_y``
(pixels from the reference), ``gradient_x``, ``gradient_y`` (rad/µm),
``bright_field`` (counts) and, with a monitor, ``bright_field_norm``.

Assumptions: the disc stays on the detector; the background is negligible
against the bright field (no thresholding); x runs along detector columns,
y along rows, as the sample axes samx/samy.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.processors import Batch, Processor, declared_frames, monitor_scale

STREAM_ARRAY = {"type": "string", "pattern": "^[^/]+/[^/]+$"}


class Dpc(Processor):
    settings_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["detector"],
        "properties": {
            "detector": {"type": "string", "minLength": 1},
            "image": {"type": "string", "minLength": 1, "default": "image"},
            "method": {"enum": ["com"], "default": "com"},
            "shift_px_per_rad_per_um": {"type": "number", "exclusiveMinimum": 0},
            "distance_m": {"type": "number", "exclusiveMinimum": 0},
            "wavelength_m": {"type": "number", "exclusiveMinimum": 0},
            "pixel_size_m": {"type": "number", "exclusiveMinimum": 0},
            "reference_px": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
            "normalise_by": STREAM_ARRAY,
        },
        "anyOf": [{"required": ["shift_px_per_rad_per_um"]},
                  {"required": ["distance_m", "wavelength_m", "pixel_size_m"]}],
    }

    @classmethod
    def check_settings(cls, scan, settings) -> dict:
        settings = super().check_settings(scan, settings)
        name, shape = declared_frames(scan, settings, "DPC")
        reference = settings.get("reference_px")
        if shape is not None and reference is not None and not (
                0 <= reference[0] <= shape[1] - 1 and 0 <= reference[1] <= shape[0] - 1):
            raise ValueError(f"reference_px {reference} is outside the {shape[1]} x {shape[0]} frames of {name}")
        if not math.isfinite(cls.px_per_rad_per_um(settings)):
            raise ValueError("the DPC geometry gives no finite shift per phase gradient")
        return settings

    @staticmethod
    def px_per_rad_per_um(settings: dict) -> float:
        """Pixels of beam shift per rad/µm of phase gradient, given or from the geometry."""
        return settings.get("shift_px_per_rad_per_um") or \
            settings["distance_m"] * settings["wavelength_m"] / (2 * math.pi) * 1e6 / settings["pixel_size_m"]

    def start_scan(self, scan, settings) -> None:
        super().start_scan(scan, settings)
        s = self.settings
        self.name, self.shape = declared_frames(scan, s, "DPC")
        self.scale = self.px_per_rad_per_um(s)
        self.monitor = s.get("normalise_by")
        self._grids: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _weights(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Column and row coordinates relative to the reference, per pixel."""
        if shape not in self._grids:
            reference = self.settings.get("reference_px", [(shape[1] - 1) / 2, (shape[0] - 1) / 2])
            self._grids[shape] = (np.arange(shape[1], dtype=np.float64) - reference[0],
                                  np.arange(shape[0], dtype=np.float64) - reference[1])
        return self._grids[shape]

    def process(self, batch: Batch) -> dict[str, np.ndarray]:
        frames = batch.array(self.name, self.shape)
        if frames.ndim != 3:
            raise ValueError(f"{self.name} has shape {frames.shape[1:]} per point; DPC needs 2-D frames")
        cols, rows = self._weights(frames.shape[1:])
        # project once per axis: two small matrix products instead of per-pixel weights
        by_col = frames.sum(axis=1, dtype=np.float64)  # (n, width)
        by_row = frames.sum(axis=2, dtype=np.float64)  # (n, height)
        total = by_col.sum(axis=1)
        if (total <= 0).any():
            dark = np.flatnonzero(total <= 0) + batch.index
            raise ValueError(f"{self.name}: no counts in the frames of points {dark[:10].tolist()} (beam off?)")
        com_x = by_col @ cols / total
        com_y = by_row @ rows / total
        out = {"com_x": com_x, "com_y": com_y, "gradient_x": com_x / self.scale, "gradient_y": com_y / self.scale,
               "bright_field": total}
        if self.monitor:
            out["bright_field_norm"] = total * monitor_scale(batch, self.monitor)
        return out
