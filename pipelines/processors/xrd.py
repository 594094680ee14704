"""``xrd``: azimuthal integration of diffraction frames and phase maps.

Per scan, a pyFAI ``AzimuthalIntegrator`` is built once from the geometry in
the settings (pyFAI's own ``get_config()`` dictionary, as a PONI file holds
it); its sparse (CSR) integration engine is built on the first frame and
reused for every other. Per frame: the 1-D pattern (``pattern``), with
pyFAI's solid-angle correction, the mask and the dark/flat frames if given.

Phase maps: for every phase (cubic, ``services.physics.powder``) the processor
places its rings in the pattern's radial unit, keeps those at least three
window widths away from every other phase's rings (an overlapped ring tells
nothing about which phase is there), and sums each ring's window minus the
side bands' level. The windows become one weight matrix, so all phases of
a whole batch are one matrix product. ``<phase>`` is that intensity,
``<phase>_norm`` divided by the monitor.

Settings: ``detector`` (stream), ``image`` (array, default ``image``),
``geometry`` (pyFAI config), ``npt_radial`` (default 1000), ``unit``
(``2th_deg`` or ``q_nm^-1``), ``method`` (pyFAI's, default
``["bbox", "csr", "cython"]``), ``mask``, ``dark``, ``flat`` (paths of
``.npy`` frames), ``phases`` (list of ``{name, lattice_A, structure}``),
``window`` (half width of a ring's window, in ``unit``; default 4 bins),
``normalise_by`` (monitor ``stream/array``).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import numpy as np

from pipelines.processors import Batch, Processor, declared_frames, monitor_scale
from services.physics.powder import CubicPhase, reflections
from services.physics.pyfai import integrator, integrator_module

UNITS = ("2th_deg", "q_nm^-1")
FRAME_FILES = ("mask", "dark", "flat")


@functools.lru_cache(maxsize=64)
def _geometry_problem(geometry_json: str) -> str:
    """Why pyFAI cannot load this geometry ("" if it can). Cached by the
    geometry's text: a beamline reuses one geometry for many scans, so the
    master pays pyFAI's import and load once, not per StartScan."""
    try:
        integrator(json.loads(geometry_json))
    except Exception as exc:  # pyFAI says what is wrong with the geometry
        return f"the pyFAI geometry cannot be loaded: {type(exc).__name__}: {exc}"
    return ""


def _frame_file_shape(key: str, path: str) -> tuple[int, ...]:
    """The frame shape of a ``.npy`` mask/dark/flat, from its header only (no
    data read: the master checks it on every StartScan); ValueError naming
    the file if it cannot be read or is not one 2-D frame."""
    try:
        frame = np.load(path, mmap_mode="r")  # header parsed, data mapped, not read
        shape, dtype = frame.shape, frame.dtype
        del frame
    except (OSError, ValueError) as exc:
        raise ValueError(f"{key} {path!r} cannot be read as a .npy frame: {exc}") from None
    if len(shape) != 2 or dtype.kind not in "biuf":
        raise ValueError(f"{key} {path!r} holds a {dtype} array of shape {list(shape)}, not one 2-D frame")
    return tuple(shape)


def ring_positions(phase: CubicPhase, wavelength_A: float, unit: str, limit: float) -> list[tuple[float, float]]:
    """(position in ``unit``, relative intensity) of the phase's rings below ``limit``."""
    out = []
    for r in reflections(phase, wavelength_A):
        if unit == "2th_deg":
            x = math.degrees(r.two_theta_rad)
        else:
            x = 4 * math.pi * math.sin(r.two_theta_rad / 2) / (wavelength_A / 10)
        if x < limit:
            out.append((x, r.intensity))
    return out


class Xrd(Processor):
    settings_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["detector", "geometry"],
        "properties": {
            "detector": {"type": "string", "minLength": 1},
            "image": {"type": "string", "minLength": 1},
            "geometry": {"type": "object", "required": ["dist", "poni1", "poni2", "wavelength", "detector"]},
            "npt_radial": {"type": "integer", "minimum": 10, "maximum": 100000},
            "unit": {"enum": list(UNITS)},
            "method": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3},
            "mask": {"type": "string"}, "dark": {"type": "string"}, "flat": {"type": "string"},
            "phases": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "lattice_A", "structure"],
                "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"},
                               "lattice_A": {"type": "number", "exclusiveMinimum": 0},
                               "structure": {"type": "string"}}}},
            "window": {"type": "number", "exclusiveMinimum": 0},
            "normalise_by": {"type": "string", "pattern": "^[^/]+/[^/]+$"},
        },
    }

    @classmethod
    def prepare(cls) -> None:
        integrator_module()

    @classmethod
    def check_settings(cls, scan, settings) -> dict:
        settings = super().check_settings(scan, settings)
        name, shape = declared_frames(scan, settings, "XRD")
        problem = _geometry_problem(json.dumps(settings["geometry"], sort_keys=True))
        if problem:
            raise ValueError(problem)
        for key in FRAME_FILES:
            if key in settings:
                frame_shape = _frame_file_shape(key, settings[key])
                if shape is not None and frame_shape != tuple(shape):
                    raise ValueError(f"{key} {settings[key]!r} has shape {list(frame_shape)}, "
                                     f"the frames of {name} {list(shape)}")
        names = [p["name"] for p in settings.get("phases", [])]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique: {names}")
        for phase in settings.get("phases", []):
            CubicPhase.from_json(phase)  # ValueError naming the phase for an unknown structure
        return settings

    def start_scan(self, scan, settings) -> None:
        super().start_scan(scan, settings)
        s = self.settings
        self.name, self.shape = declared_frames(scan, s, "XRD")
        self.ai = integrator(s["geometry"])  # loadable: check_settings tried it
        self.npt = s.get("npt_radial", 1000)
        self.unit = s.get("unit", "2th_deg")
        self.method = tuple(s.get("method", ("bbox", "csr", "cython")))
        self.extra = {k: np.load(s[k]) for k in FRAME_FILES if k in s}
        self.phases = [CubicPhase.from_json(p) for p in s.get("phases", [])]
        self.monitor = s.get("normalise_by")
        self.radial: np.ndarray | None = None
        self.weights: np.ndarray | None = None
        self.windows: dict[str, list[float]] = {}

    def integrate(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(radial, intensity) of one frame, exactly as pyFAI's integrate1d gives them."""
        result = self.ai.integrate1d(frame, self.npt, unit=self.unit, method=self.method, **self.extra)
        return result.radial, result.intensity

    def _phase_weights(self, radial: np.ndarray) -> np.ndarray:
        """(npt, phases): +1 in a ring's window, minus the side bands' share."""
        step = float(radial[1] - radial[0])
        half = self.settings.get("window", 4 * step)
        wavelength = self.ai.wavelength * 1e10
        rings = {p.name: ring_positions(p, wavelength, self.unit, float(radial[-1]) - 2 * half) for p in self.phases}
        weights = np.zeros((len(radial), len(self.phases)))
        for k, phase in enumerate(self.phases):
            others = [x for name, rs in rings.items() if name != phase.name for x, _ in rs]
            clean = [x for x, _ in rings[phase.name]
                     if x - 2 * half > radial[0] and all(abs(x - o) > 3 * half for o in others)]
            self.windows[phase.name] = clean
            for x in clean:
                inside = np.abs(radial - x) <= half
                side = (np.abs(radial - x) > half) & (np.abs(radial - x) <= 2 * half)
                weights[inside, k] += 1.0
                weights[side, k] -= inside.sum() / max(side.sum(), 1)
        return weights

    def process(self, batch: Batch) -> dict[str, np.ndarray]:
        frames = batch.array(self.name, self.shape)
        if frames.ndim != 3:
            raise ValueError(f"{self.name} has shape {frames.shape[1:]} per point; XRD needs 2-D frames")
        patterns = np.empty((batch.count, self.npt), np.float32)
        for j in range(batch.count):
            radial, patterns[j] = self.integrate(frames[j])
            if self.radial is None:
                self.radial = radial
                self.weights = self._phase_weights(radial)
        out: dict[str, Any] = {"pattern": patterns}
        if self.phases:
            intensities = patterns.astype(np.float64) @ self.weights
            scale = monitor_scale(batch, self.monitor) if self.monitor else None
            for k, phase in enumerate(self.phases):
                out[phase.name] = intensities[:, k]
                if scale is not None:
                    out[f"{phase.name}_norm"] = intensities[:, k] * scale
        return out
