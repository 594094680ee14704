"""``xrf``: element intensities from energy-dispersive XRF spectra.

Two estimates per element and point, both vectorised over the batch:

* **fit**: a linear least-squares fit of the spectrum by a reference matrix
  built once per scan: one row per element (its line family: xraylib line
  energies, weighted by their production cross sections at the incident
  energy, Gaussians of the detector's Fano-limited width), the elastic and
  Compton scatter peaks, and a few broad Gaussians for the continuum. The
  pseudo-inverse is precomputed, so a batch is one matrix product (the spectra are projected on the components once; refits
solve small systems with the precomputed Gram matrix). Elements
  that come out negative are refitted without those elements (one active-set
  pass, per pattern of negatives), then clipped at zero: an element cannot
  emit negative counts, and without that step its negative noise would leak
  into its neighbours. Overlapping lines (a K-beta on a neighbour's K-alpha)
  are separated because each element is fitted with its whole family.
* **ROI**: counts in a window of ``roi_fwhm`` FWHM around the element's
  strongest line, minus the level of the bands beside it. Cheap and robust,
  but an overlapping line of another element lands in the window too.

Both are corrected for dead time (``icr / ocr`` from the detector, when the
stream has them) and, with ``normalise_by``, divided by the monitor.

Settings: ``detector`` (stream), ``mca`` (array, default ``mca``; per point
``(channels,)`` or ``(elements, channels)``, summed), ``elements``
({symbol: "K" | "L"}), ``energy_calibration``, ``resolution``
({noise_fwhm_keV, fano}), ``incident_energy_keV``, ``fit_range_keV``,
``compton_angle_deg`` (90), ``compton_fwhm_keV`` (0.35), ``background_terms``
(6), ``roi_fwhm`` (1.0), ``dead_time`` (true), ``normalise_by``. Results per
element ``<El>`` (fit), ``<El>_roi``, with a monitor ``<El>_norm``; and
``elastic``, ``compton`` (fitted counts), ``counts`` (total in the fit range).
"""

from __future__ import annotations

import numpy as np

from pipelines.processors import Batch, Processor, declared_shape, monitor_scale
from services.physics.xraylines import Calibration, Resolution, compton_keV, emission_lines, gaussian_counts

CALIBRATION = {"type": "object", "required": ["offset_keV", "gain_keV_per_channel"], "properties": {
    "offset_keV": {"type": "number"}, "gain_keV_per_channel": {"type": "number", "exclusiveMinimum": 0},
    "quadratic_keV_per_channel2": {"type": "number"}}}


class Xrf(Processor):
    settings_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["detector", "elements", "energy_calibration", "incident_energy_keV"],
        "properties": {
            "detector": {"type": "string", "minLength": 1},
            "mca": {"type": "string", "minLength": 1},
            "elements": {"type": "object", "minProperties": 1,
                         "propertyNames": {"pattern": "^[A-Z][a-z]?$"},
                         "additionalProperties": {"enum": ["K", "L"]}},
            "energy_calibration": CALIBRATION,
            "resolution": {"type": "object", "additionalProperties": False, "properties": {
                "noise_fwhm_keV": {"type": "number", "exclusiveMinimum": 0},
                "fano": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}},
            "incident_energy_keV": {"type": "number", "exclusiveMinimum": 0},
            "fit_range_keV": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
            "compton_angle_deg": {"type": "number", "minimum": 0, "maximum": 180},
            "compton_fwhm_keV": {"type": "number", "exclusiveMinimum": 0},
            "background_terms": {"type": "integer", "minimum": 0, "maximum": 32},
            "roi_fwhm": {"type": "number", "exclusiveMinimum": 0},
            "dead_time": {"type": "boolean"},
            "normalise_by": {"type": "string", "pattern": "^[^/]+/[^/]+$"},
        },
    }

    @classmethod
    def check_settings(cls, scan, settings) -> dict:
        settings = super().check_settings(scan, settings)
        name = f"{settings['detector']}/{settings.get('mca', 'mca')}"
        shape = declared_shape(scan, name)
        if shape is not None and len(shape) not in (1, 2):
            raise ValueError(f"{name} is declared with shape {list(shape)} per point; XRF needs spectra "
                             "(channels,) or (elements, channels)")
        lo_hi = settings.get("fit_range_keV")
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"fit_range_keV {lo_hi} is empty: give [low, high] with low < high")
        cls.lines_of(settings)
        return settings

    @staticmethod
    def lines_of(settings: dict) -> dict[str, tuple]:
        """Each element's lines excited at the incident energy (xraylib, cached);
        ValueError for an unknown element or a series not excited."""
        incident = float(settings["incident_energy_keV"])
        out = {}
        for element, series in settings["elements"].items():
            try:
                lines = emission_lines(element, series, incident)
            except ValueError as exc:
                raise ValueError(f"element {element}: {exc}") from None
            if not lines:
                raise ValueError(f"{element} {series} lines are not excited at {incident:g} keV")
            out[element] = lines
        return out

    def start_scan(self, scan, settings) -> None:
        super().start_scan(scan, settings)
        s = self.settings
        self.name = f"{s['detector']}/{s.get('mca', 'mca')}"
        self.shape = declared_shape(scan, self.name)
        self.calibration = Calibration.from_json(s["energy_calibration"])
        self.resolution = Resolution(**s.get("resolution", {}))
        self.incident = float(s["incident_energy_keV"])
        self.elements = list(s["elements"])
        self.lines = self.lines_of(s)
        self.monitor = s.get("normalise_by")
        self.channels: int | None = None

    # ------------------------------------------------------------ per scan, on the first spectrum
    def _prepare(self, channels: int) -> None:
        s = self.settings
        lo, hi = s.get("fit_range_keV", [1.0, self.incident + 0.6])
        energy = self.calibration.energy(np.arange(channels))
        window = np.flatnonzero((energy >= lo) & (energy <= hi))
        if window.size < 10:
            raise ValueError(f"fit range [{lo}, {hi}] keV covers {window.size} channels of {channels}")
        self.window = slice(int(window[0]), int(window[-1]) + 1)
        edges = self.calibration.edges(channels)[self.window.start:self.window.stop + 1]
        rows = []
        for element in self.elements:
            total = sum(line.cross_section_cm2_g for line in self.lines[element])
            rows.append(sum(line.cross_section_cm2_g / total *
                            gaussian_counts(edges, line.energy_keV, float(self.resolution.sigma_keV(line.energy_keV)))
                            for line in self.lines[element]))
        rows.append(gaussian_counts(edges, self.incident, float(self.resolution.sigma_keV(self.incident))))
        compton = compton_keV(self.incident, s.get("compton_angle_deg", 90.0))
        wide = float(np.hypot(self.resolution.sigma_keV(compton), s.get("compton_fwhm_keV", 0.35) / 2.3548))
        rows.append(gaussian_counts(edges, compton, wide))
        terms = s.get("background_terms", 6)
        centres = 0.5 * (edges[1:] + edges[:-1])
        for c in np.linspace(lo, hi, terms) if terms else ():
            rows.append(np.exp(-0.5 * ((centres - c) / ((hi - lo) / max(terms - 1, 1))) ** 2))
        self.reference = np.array(rows)  # (components, channels in range)
        self.gram = self.reference @ self.reference.T
        if np.linalg.matrix_rank(self.gram) < len(rows):
            raise ValueError("the fit's components are not independent (two elements with the same lines?)")
        self.gram_inv = np.linalg.inv(self.gram)
        # one pass over the data per batch: projections on the components and the ROI windows together
        # float32 halves the memory traffic; its rounding moves fitted counts by ~1e-5 relative (tested),
        # far below the counting noise
        self.projection = np.concatenate([self.reference.T, self._roi_weights(energy)[self.window]],
                                         axis=1).astype(np.float32)
        self.channels = channels

    def _roi_weights(self, energy: np.ndarray) -> np.ndarray:
        """(channels, elements): +1 in the window of the strongest line, minus the side bands' share."""
        weights = np.zeros((len(energy), len(self.elements)))
        width = self.settings.get("roi_fwhm", 1.0)
        for k, element in enumerate(self.elements):
            line = max(self.lines[element], key=lambda l: l.cross_section_cm2_g)
            half = width * float(self.resolution.fwhm_keV(line.energy_keV))
            distance = np.abs(energy - line.energy_keV)
            inside, side = distance <= half, (distance > half) & (distance <= 2 * half)
            weights[inside, k] = 1.0
            weights[side, k] = -inside.sum() / max(side.sum(), 1)
        return weights

    # ------------------------------------------------------------ per batch
    def project(self, mca: np.ndarray) -> np.ndarray:
        """(n, components + elements): the spectra's fit range projected on the
        fit's components and the ROI windows, float64. The one pass over the data."""
        return (mca[:, self.window].astype(np.float32) @ self.projection).astype(np.float64)

    def fit(self, mca: np.ndarray) -> np.ndarray:
        """(n, components) amplitudes, elements non-negative."""
        return self._solve(self.project(mca)[:, :len(self.reference)])

    def _solve(self, projected: np.ndarray) -> np.ndarray:
        """Least squares from the projections ``R y`` (normal equations with the
        precomputed Gram matrix; refits of element subsets are k x k solves)."""
        amplitudes = projected @ self.gram_inv.T
        n_el = len(self.elements)
        negative = amplitudes[:, :n_el] < 0
        if not negative.any():
            return amplitudes
        codes = negative.astype(np.int64) @ (1 << np.arange(n_el, dtype=np.int64))  # one integer per pattern
        order = np.argsort(codes, kind="stable")
        for rows in np.split(order, np.flatnonzero(np.diff(codes[order])) + 1):
            if codes[rows[0]] == 0:
                continue
            keep = np.concatenate([~negative[rows[0]], np.ones(len(self.reference) - n_el, bool)])
            refit = projected[rows][:, keep] @ np.linalg.inv(self.gram[np.ix_(keep, keep)]).T
            amplitudes[rows] = 0.0
            amplitudes[rows[:, None], np.flatnonzero(keep)] = refit
        amplitudes[:, :n_el] = np.clip(amplitudes[:, :n_el], 0.0, None)
        return amplitudes

    def process(self, batch: Batch) -> dict[str, np.ndarray]:
        mca = batch.array(self.name, self.shape)
        if mca.ndim == 3:
            mca = mca.sum(axis=1, dtype=np.float64)  # detector elements summed
        elif mca.ndim != 2:
            raise ValueError(f"{self.name} has shape {mca.shape[1:]} per point; XRF needs spectra")
        if self.channels is None:
            self._prepare(mca.shape[1])
        elif mca.shape[1] != self.channels:
            raise ValueError(f"{self.name} has {mca.shape[1]} channels, this scan's spectra {self.channels}")
        projected = self.project(mca)
        components = len(self.reference)
        amplitudes = self._solve(projected[:, :components])
        roi = projected[:, components:]
        scale = np.ones(batch.count)
        stream = batch.stream(self.settings["detector"])
        if self.settings.get("dead_time", True) and "icr" in stream and "ocr" in stream:
            icr, ocr = (stream[k].astype(np.float64).reshape(batch.count, -1).sum(axis=1) for k in ("icr", "ocr"))
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.where(ocr > 0, icr / ocr, 1.0)
        out = {"counts": mca[:, self.window].sum(axis=1, dtype=np.float64), "elastic": amplitudes[:, len(self.elements)] * scale,
               "compton": amplitudes[:, len(self.elements) + 1] * scale}
        norm = monitor_scale(batch, self.monitor) if self.monitor else None
        for k, element in enumerate(self.elements):
            out[element] = amplitudes[:, k] * scale
            out[f"{element}_roi"] = roi[:, k] * scale
            if norm is not None:
                out[f"{element}_norm"] = out[element] * norm
        return out
