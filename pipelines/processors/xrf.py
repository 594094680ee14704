"""``xrf``: element intensities from energy-dispersive XRF spectra.

Per batch, vectorised over its points (docs/modalities/xrf.md has the
measurements on real spectra behind each choice):

1. **Continuum** (``background.method``): ``snip`` (default), a SNIP strip of
   each spectrum, subtracted: it never rises above the data, so it cannot go
   negative between peaks or trade counts with the lines, and a point's
   values never depend on its batch. ``snip_scan``, for maps: the SNIP of the
   scan's first batch's mean spectrum (low noise) is one more component, its
   amplitude fitted per point; ten times faster, and unbiased at the low
   counts of map pixels, where a SNIP of a noisy spectrum sits low.
2. **Lines**: a linear least-squares fit by the components of
   services/physics/xrfmodel.py: one per element and series (K, L, M or
   PyMca's Ka / Kb / L1..L3 / M1..M5 groups), each with all its xraylib lines
   in their detected proportions (path attenuation, detector efficiency,
   optional thick-sample self-absorption) and their escape peaks; the elastic
   and Compton peaks when they lie in the fit range (else dropped, with the
   reason in ``model.dropped``). ``weights``: ``uniform`` (default, as PyMca's
   fast map fit) or ``poisson`` (``1 / max(mean of the first batch, 1)``, frozen
   for the scan). One matrix product per batch; negative lines are refitted
   without them (one active-set pass per pattern of negatives), then clipped.
3. **Pile-up** (``pileup``): the first batch's fitted line spectrum convolved
   with itself is one more component, its amplitude per point.
4. **Quality**: ``chi2_reduced`` per point, with the point's own Poisson
   variance, so a user sees where the model fails (a missing element).
   ``entangled`` (per scan) names lines whose split with a neighbour rests on
   the database's line ratios (fit correlation >= 0.5).
5. **ROI**: counts in ``roi_fwhm`` FWHM around each element's strongest line
   minus the continuum under them, and ``<El>_roi_overlap``: the share of the
   fitted counts in that window that belong to other lines (``overlaps`` names them).

Settings may start from a PyMca ``.cfg`` text (``pymca_config``, read by
services/physics/pymca_config.py); explicit settings override it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipelines.processors import Batch, Processor, declared_shape, monitor_scale
from services.physics.absorption import Layer, Matrix
from services.physics.continuum import snip
from services.physics.pymca_config import read_pymca_config
from services.physics.xraylines import SERIES_SHELLS, Calibration, Resolution, series_lines
from services.physics.xrfmodel import Model, Setup, build, pileup_shape
from services.schema import validate_against

log = logging.getLogger(__name__)

CALIBRATION = {"type": "object", "required": ["offset_keV", "gain_keV_per_channel"], "properties": {
    "offset_keV": {"type": "number"}, "gain_keV_per_channel": {"type": "number", "exclusiveMinimum": 0},
    "quadratic_keV_per_channel2": {"type": "number"}}}
MATERIAL = {"oneOf": [{"type": "string", "minLength": 1},
                      {"type": "object", "minProperties": 1, "additionalProperties": {"type": "number", "minimum": 0}}]}
LAYER = {"type": "object", "additionalProperties": False, "required": ["material", "density_g_cm3", "thickness_cm"],
         "properties": {"material": MATERIAL, "density_g_cm3": {"type": "number", "exclusiveMinimum": 0},
                        "thickness_cm": {"type": "number", "minimum": 0}}}
SERIES = {"enum": sorted(SERIES_SHELLS)}
#: |correlation| of two lines' fitted amplitudes above which their split is reported as database-dependent.
ENTANGLED = 0.5
REQUIRED = ["elements", "energy_calibration", "incident_energy_keV"]


class Xrf(Processor):
    settings_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["detector"],
        "properties": {
            "detector": {"type": "string", "minLength": 1},
            "mca": {"type": "string", "minLength": 1},
            "pymca_config": {"type": "string", "minLength": 1},
            "elements": {"type": "object", "minProperties": 1,
                         "propertyNames": {"pattern": "^[A-Z][a-z]?$"},
                         "additionalProperties": {"oneOf": [SERIES, {"type": "array", "items": SERIES,
                                                                      "minItems": 1, "uniqueItems": True}]}},
            "energy_calibration": CALIBRATION,
            "resolution": {"type": "object", "additionalProperties": False, "properties": {
                "noise_fwhm_keV": {"type": "number", "exclusiveMinimum": 0},
                "fano": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}},
            "incident_energy_keV": {"type": "number", "exclusiveMinimum": 0},
            "fit_range_keV": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
            "scatter": {"type": "boolean"},
            "compton_angle_deg": {"type": "number", "minimum": 0, "maximum": 180},
            "compton_fwhm_keV": {"type": "number", "exclusiveMinimum": 0},
            "escape": {"type": "boolean"},
            "pileup": {"type": "boolean"},
            "detector_crystal": LAYER,
            "attenuators": {"type": "array", "items": LAYER},
            "matrix": {"type": "object", "additionalProperties": False,
                       "required": ["material", "density_g_cm3", "thickness_cm"],
                       "properties": {**LAYER["properties"],
                                      "angle_in_deg": {"type": "number", "exclusiveMinimum": 0, "maximum": 90},
                                      "angle_out_deg": {"type": "number", "exclusiveMinimum": 0, "maximum": 90}}},
            "background": {"type": "object", "additionalProperties": False, "properties": {
                "method": {"enum": ["snip", "snip_scan", "none"]},
                "terms": {"type": "integer", "minimum": 0, "maximum": 6},
                "width_keV": {"type": "number", "exclusiveMinimum": 0},
                "smoothing_channels": {"type": "integer", "minimum": 1, "maximum": 64},
                "binning": {"type": "integer", "minimum": 1, "maximum": 16}}},
            "background_terms": {"type": "integer", "minimum": 0, "maximum": 32},
            "roi_fwhm": {"type": "number", "exclusiveMinimum": 0},
            "weights": {"enum": ["uniform", "poisson"]},
            "dead_time": {"type": "boolean"},
            "normalise_by": {"type": "string", "pattern": "^[^/]+/[^/]+$"},
        },
    }

    @classmethod
    def check_settings(cls, scan, settings) -> dict:
        settings = dict(super().check_settings(scan, settings))  # a copy: the caller's document stays as given
        if "pymca_config" in settings:  # the file's facts first, explicit settings over them
            explicit = {k: v for k, v in settings.items() if k != "pymca_config"}
            settings = validate_against(cls.settings_schema, "Xrf settings (with pymca_config)",
                                        {**read_pymca_config(settings["pymca_config"]), **explicit})
        missing = [k for k in REQUIRED if k not in settings]
        if missing:
            raise ValueError(f"xrf settings lack {missing} (give them, or a pymca_config that has them)")
        settings["elements"] = {el: [s] if isinstance(s, str) else list(s) for el, s in settings["elements"].items()}
        name = f"{settings['detector']}/{settings.get('mca', 'mca')}"
        shape = declared_shape(scan, name)
        if shape is not None and len(shape) not in (1, 2):
            raise ValueError(f"{name} is declared with shape {list(shape)} per point; XRF needs spectra "
                             "(channels,) or (elements, channels)")
        lo_hi = settings.get("fit_range_keV")
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"fit_range_keV {lo_hi} is empty: give [low, high] with low < high")
        setup = cls.setup_of(settings)  # materials parse, lines excited
        lo, hi = settings.get("fit_range_keV", [1.0, setup.incident_keV + 0.6])
        for element, series in setup.elements.items():
            energies = [line.energy_keV for s in series for line in series_lines(element, s, setup.incident_keV)]
            if not any(lo <= e <= hi for e in energies):
                raise ValueError(f"{element} {'/'.join(series)} lines ({min(energies):.2f}-{max(energies):.2f} keV) "
                                 f"lie outside the fit range [{lo:.2f}, {hi:.2f}] keV")
        return settings

    @staticmethod
    def setup_of(settings: dict[str, Any]) -> Setup:
        """The model's inputs from checked settings; ValueError naming an unknown
        element, a series not excited at the incident energy, an unparsable material."""
        incident = float(settings["incident_energy_keV"])
        for element, series in settings["elements"].items():
            for s in series:
                try:
                    lines = series_lines(element, s, incident)
                except ValueError as exc:
                    raise ValueError(f"element {element}: {exc}") from None
                if not lines:
                    raise ValueError(f"{element} {s} lines are not excited at {incident:g} keV")

        def layer(doc: dict) -> Layer:
            material = doc["material"]
            material = {material: 1.0} if isinstance(material, str) else material
            try:
                return Layer.of(material, doc["density_g_cm3"], doc["thickness_cm"])
            except ValueError as exc:
                raise ValueError(f"xrf settings: {exc}") from None

        matrix = settings.get("matrix")
        return Setup(
            calibration=Calibration.from_json(settings["energy_calibration"]),
            resolution=Resolution(**settings.get("resolution", {})),
            incident_keV=incident,
            elements={el: tuple(s) for el, s in settings["elements"].items()},
            path=tuple(layer(a) for a in settings.get("attenuators", [])),
            detector=layer(settings["detector_crystal"]) if "detector_crystal" in settings else None,
            matrix=Matrix(layer(matrix), matrix.get("angle_in_deg", 45.0), matrix.get("angle_out_deg", 45.0))
            if matrix else None,
            escape=settings.get("escape", True),
            scatter=settings.get("scatter", True),
            compton_angle_deg=settings.get("compton_angle_deg", 90.0),
            compton_fwhm_keV=settings.get("compton_fwhm_keV", 0.35),
        )

    def start_scan(self, scan, settings) -> None:
        super().start_scan(scan, settings)
        s = self.settings
        self.name = f"{s['detector']}/{s.get('mca', 'mca')}"
        self.shape = declared_shape(scan, self.name)
        self.setup = self.setup_of(s)
        self.incident = self.setup.incident_keV
        self.elements = list(s["elements"])
        self.monitor = s.get("normalise_by")
        self.channels: int | None = None

    # ------------------------------------------------------------ per scan, on the first spectrum
    def _prepare(self, channels: int) -> None:
        s, cal = self.settings, self.setup.calibration
        lo, hi = s.get("fit_range_keV", [1.0, self.incident + 0.6])
        energy = cal.energy(np.arange(channels))
        window = np.flatnonzero((energy >= lo) & (energy <= hi))
        if window.size < 10:
            raise ValueError(f"fit range [{lo}, {hi}] keV covers {window.size} channels of {channels}")
        self.window = slice(int(window[0]), int(window[-1]) + 1)
        edges = cal.edges(channels)[self.window.start:self.window.stop + 1]
        self.model: Model = build(self.setup, edges)
        for name, why in self.model.dropped.items():
            log.info("xrf: %s not fitted: %s", name, why)
        fitted = {c.element for c in self.model.components if c.element}
        lost = [el for el in self.elements if el not in fitted]
        if lost:
            raise ValueError("; ".join(why for name, why in self.model.dropped.items() if name.split()[0] in lost))
        rows = [c.shape for c in self.model.components]
        self.names = [c.name for c in self.model.components]
        terms = s.get("background_terms", 0)
        centres = 0.5 * (edges[1:] + edges[:-1])
        for k, c in enumerate(np.linspace(lo, hi, terms) if terms else ()):
            rows.append(np.exp(-0.5 * ((centres - c) / ((hi - lo) / max(terms - 1, 1))) ** 2))
            self.names.append(f"background {k}")
        self.reference = np.array(rows)  # (components, channels in range)
        self._check_independent(self.reference)
        self.is_line = np.array([c.element is not None for c in self.model.components] + [False] * terms)
        self.series = {el: [i for i, c in enumerate(self.model.components) if c.element == el] for el in self.elements}
        self.roi = self._roi_windows(energy[self.window])
        # what of each component falls in each ROI window: the fitted overlap per point is then (n, k) @ (k, E)
        self.roi_content = self.reference @ self.roi
        self.overlaps = self._overlaps()
        bg = s.get("background", {})
        self.background = None if bg.get("method", "snip") == "none" else {
            "method": bg.get("method", "snip"), "terms": bg.get("terms", 0),
            "width": max(int(round(bg.get("width_keV", 0.6) / cal.gain_keV_per_channel)), 1),
            "binning": bg.get("binning", 1), "smoothing": bg.get("smoothing_channels", 3)}
        self.entangled: dict[str, tuple[str, float]] | None = None
        self.frozen: dict[str, Any] | None = None
        self.channels = channels

    def _check_independent(self, reference: np.ndarray) -> None:
        """Refuse a model whose components cannot be told apart, naming them
        (the usual cause: one element given twice as overlapping series, e.g. K and Ka)."""
        norms = np.linalg.norm(reference, axis=1)
        unit = reference / np.where(norms > 0, norms, 1)[:, None]
        cos = unit @ unit.T
        np.fill_diagonal(cos, 0)
        i, j = np.unravel_index(np.argmax(cos), cos.shape)
        if cos[i, j] > 0.999:
            raise ValueError(f"components {self.names[i]!r} and {self.names[j]!r} have the same lines in the fit "
                             "range and cannot be fitted apart: keep one of them")
        if np.linalg.matrix_rank(reference @ reference.T) < len(reference):
            raise ValueError(f"the fit's components {self.names} are linearly dependent in the fit range")

    def _roi_windows(self, energy: np.ndarray) -> np.ndarray:
        """(window channels, elements): 1 within ``roi_fwhm`` FWHM of the element's strongest fitted line."""
        weights = np.zeros((len(energy), len(self.elements)))
        width = self.settings.get("roi_fwhm", 1.0)
        self.roi_lines = {}
        for k, element in enumerate(self.elements):
            shares = [(line, share * self.model.components[i].in_window)
                      for i in self.series[element] for line, share in self.model.components[i].lines
                      if energy[0] <= line.energy_keV <= energy[-1]]
            shares = shares or [(line, share) for i in self.series[element] for line, share in
                                self.model.components[i].lines]  # only a tail in the window: its nearest line
            line = max(shares, key=lambda ls: ls[1])[0]
            half = width * float(self.setup.resolution.fwhm_keV(line.energy_keV))
            weights[np.abs(energy - line.energy_keV) <= half, k] = 1.0
            self.roi_lines[element] = (line, half)
        return weights

    def _overlaps(self) -> dict[str, list[str]]:
        """Element -> the other components with a line inside its ROI window (logged once per scan)."""
        out = {}
        for k, element in enumerate(self.elements):
            line, half = self.roi_lines[element]
            others = sorted({f"{c.name} {ln.name} {ln.energy_keV:.3f} keV" for c in self.model.components
                             if c.element != element for ln, share in c.lines
                             if abs(ln.energy_keV - line.energy_keV) <= half + float(
                                 self.setup.resolution.fwhm_keV(ln.energy_keV)) and share > 0.01})
            out[element] = others
            if others:
                log.info("xrf: the %s ROI (%s %.3f keV) overlaps %s", element, line.name, line.energy_keV, others)
        return out

    # ------------------------------------------------------------ per batch
    def continuum(self, mca: np.ndarray) -> np.ndarray:
        """(n, window channels) continuum under the spectra (zeros without a background)."""
        if self.background is None:
            return np.zeros((len(mca), self.window.stop - self.window.start), np.float32)
        # on the window alone: its edge channels stay anchored to the data, as in PyMca's strip, so an
        # unmodelled peak just outside the range (a scatter peak left out) is not clipped into the fit
        return snip(np.asarray(mca)[:, self.window], self.background["width"], self.background["binning"],
                    self.background["smoothing"])

    def fit(self, mca: np.ndarray) -> dict[str, np.ndarray]:
        """Amplitudes (n, components), pile-up and continuum amplitudes, reduced chi²
        and ROI counts net of the continuum, for spectra (n, channels)."""
        y = mca[:, self.window].astype(np.float32)
        if self.frozen is None:
            self._freeze(mca)
        w = self.frozen["weights"]
        extra: dict[str, np.ndarray] = {}
        method = self.background and self.background["method"]
        if method == "snip":  # each spectrum's own continuum, subtracted
            net = y - self.continuum(mca)
        else:
            net = y
            extra.update(self.frozen["continuum"])
        if self.settings.get("pileup", False):
            if "pileup" not in self.frozen:  # the first batch's fitted lines, convolved with themselves
                self.extra_names = list(extra)
                first = self._solve(np.vstack([self.reference, *extra.values()]), w, net)
                lines = (first[:, :len(self.reference)].mean(axis=0) * self.is_line) @ self.reference
                self.frozen["pileup"] = pileup_shape(lines, self.setup.calibration, self.window.start)
            if self.frozen["pileup"].sum() > 0:
                extra["pileup"] = self.frozen["pileup"]
        reference = np.vstack([self.reference, *extra.values()])
        self.extra_names = list(extra)
        a = self._solve(reference, w, net)
        if self.entangled is None:
            self.entangled = self._entangled(reference, w)
        # per point, with its own Poisson variance: what a user reads as "the model holds here"
        residual = net - (a @ reference).astype(np.float32)
        chi2 = np.einsum("nc,nc->n", residual, residual / np.maximum(y, 1.0), dtype=np.float64)
        dof = max(net.shape[1] - len(reference), 1)
        fitted = {name: a[:, len(self.reference) + i] for i, name in enumerate(extra)}
        roi = (net @ self.roi.astype(np.float32)).astype(np.float64)
        for name in self.frozen["continuum"]:  # the ROI's local background: the fitted continuum under the window
            roi -= np.outer(fitted[name], extra[name] @ self.roi)
        return {"amplitudes": a[:, :len(self.reference)], "pileup": fitted.get("pileup", np.zeros(len(y))),
                "chi2_reduced": chi2 / dof, "roi": roi}

    def _freeze(self, mca: np.ndarray) -> None:
        """What the fit keeps for the whole scan, from its first batch: with
        ``weights: poisson`` the weights ``1 / max(mean spectrum, 1)`` (else uniform)
        and, for ``snip_scan``, the continuum's shape. Frozen, so that a point's
        values do not depend on the batch it came in after the first (a worker
        retries a failing batch point by point); fixed weights leave the fit
        unbiased, Poisson ones make it nearly optimal for spectra of one shape.
        Uniform weights need nothing from the data: a point's values never depend
        on its batch (PyMca's fast map fit is unweighted too)."""
        mean = mca[:, self.window].mean(axis=0, dtype=np.float64)
        continuum = {}
        if self.background and self.background["method"] == "snip_scan":
            shape = self.continuum(mca.mean(axis=0, dtype=np.float64)[None])[0].astype(np.float64)
            if shape.sum() > 0:
                # the shape, and the shape tilted and bent (Legendre 1, 2 across the window) for points
                # whose continuum differs from the first batch's; each amplitude fitted per point
                x = np.linspace(-1, 1, len(shape))
                for order in range(self.background["terms"] + 1):
                    term = shape * np.polynomial.legendre.Legendre.basis(order)(x)
                    continuum[f"continuum {order}"] = term / shape.sum()
        poisson = self.settings.get("weights", "uniform") == "poisson"
        self.frozen = {"weights": 1.0 / np.maximum(mean, 1.0) if poisson else np.ones_like(mean),
                       "continuum": continuum}

    def _entangled(self, reference: np.ndarray, w: np.ndarray) -> dict[str, tuple[str, float]]:
        """Line components whose fitted amplitude is correlated (|r| >= ENTANGLED) with
        another's, from the fit's covariance: where lines overlap this much, how
        the counts split between the two rests on the line ratios of the database
        (xraylib here, PyMca's own tables there), while their sum is well
        determined. Found on the first batch, logged once."""
        cov = np.linalg.inv((reference * w) @ reference.T)
        d = np.sqrt(np.diag(cov))
        corr = cov / np.outer(d, d)
        np.fill_diagonal(corr, 0)
        out = {}
        for i in np.flatnonzero(self.is_line):
            j = int(np.argmax(np.abs(corr[i, :len(self.is_line)] * self.is_line)))
            if abs(corr[i, j]) >= ENTANGLED:
                out[self.names[i]] = (self.names[j], round(float(corr[i, j]), 3))
        if out:
            log.info("xrf: fitted amplitudes entangled with a neighbour's (component: (other, correlation)): %s", out)
        return out

    def _solve(self, reference: np.ndarray, w: np.ndarray, net: np.ndarray) -> np.ndarray:
        """Weighted least squares through the normal equations: one (n, channels) x
        (channels, k) product; refits of element subsets are k x k solves."""
        weighted = (reference * w).astype(np.float32)  # (k, channels)
        gram = (reference * w) @ reference.T
        projected = (net @ weighted.T).astype(np.float64)  # (n, k)
        amplitudes = np.linalg.solve(gram, projected.T).T
        # lines, pile-up and the continuum's own shape cannot be negative; its tilt and bend can
        lines = np.concatenate([self.is_line, [not n.startswith("continuum ") or n == "continuum 0"
                                               for n in self.extra_names]]).astype(bool)
        negative = (amplitudes < 0) & lines
        if negative.any():
            patterns, which = np.unique(negative, axis=0, return_inverse=True)
            for p, pattern in enumerate(patterns):
                if not pattern.any():
                    continue
                rows, keep = np.flatnonzero(which.ravel() == p), ~pattern
                refit = np.linalg.solve(gram[np.ix_(keep, keep)], projected[rows][:, keep].T).T
                amplitudes[rows] = 0.0
                amplitudes[rows[:, None], np.flatnonzero(keep)] = refit
            amplitudes[:, lines] = np.clip(amplitudes[:, lines], 0.0, None)
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
        result = self.fit(mca)
        amplitudes = result["amplitudes"]
        scale = np.ones(batch.count)
        stream = batch.stream(self.settings["detector"])
        if self.settings.get("dead_time", True) and "icr" in stream and "ocr" in stream:
            icr, ocr = (stream[k].astype(np.float64).reshape(batch.count, -1).sum(axis=1) for k in ("icr", "ocr"))
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.where(ocr > 0, icr / ocr, 1.0)
        out = {"counts": mca[:, self.window].sum(axis=1, dtype=np.float64), "chi2_reduced": result["chi2_reduced"]}
        for i, name in enumerate(self.names):
            if name in ("elastic", "compton"):
                out[name] = amplitudes[:, i] * scale
        if self.settings.get("pileup", False):
            out["pileup"] = result["pileup"] * scale
        norm = monitor_scale(batch, self.monitor) if self.monitor else None
        with np.errstate(divide="ignore", invalid="ignore"):
            in_roi = amplitudes @ self.roi_content  # (n, elements) fitted counts in each ROI window
        for k, element in enumerate(self.elements):
            rows = self.series[element]
            out[element] = amplitudes[:, rows].sum(axis=1) * scale
            if len(self.settings["elements"][element]) > 1:  # each series too
                for i in rows:
                    out[self.names[i].replace(" ", "_")] = amplitudes[:, i] * scale
            out[f"{element}_roi"] = result["roi"][:, k] * scale
            own = amplitudes[:, rows] @ self.roi_content[rows, k]
            with np.errstate(divide="ignore", invalid="ignore"):
                out[f"{element}_roi_overlap"] = np.where(in_roi[:, k] > 0, 1 - own / in_roi[:, k], 0.0)
            if norm is not None:
                out[f"{element}_norm"] = out[element] * norm
        return out
