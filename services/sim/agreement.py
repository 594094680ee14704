"""How close the mesh's products come to the phantom's truth.

One list of checks for the demo's summary and for the tests, so both measure
the same thing. A check names a product (as the sink serves it), the truth it
should reproduce (the phantom at each point's true position, or on the
nominal grid for a regridded map), a measure and the pass threshold:

* ``pearson``: correlation over the map cells where both are finite; what a
  user's eye sees in a map (offsets and gains do not matter);
* ``rms_gain``: how many times closer to the true positions the corrected
  positions are than the raw encoder readings.

The thresholds follow from the simulators' noise models (services.sim.*):
counting statistics at the simulated flux leave normalised counters and
transmission well above 0.99.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from services.sim.counters import CounterModel, xbic_efficiency, xeol_yield
from services.sim.phantom import ELEMENTS, PHASES
from services.sim.sims import Simulation

Fetch = Callable[[str, "str | None"], np.ndarray]  # (product, regrid pipeline or None) -> map


@dataclass(frozen=True)
class Check:
    product: str
    truth: str  # what it is compared with, for people
    measure: str  # "pearson" or "rms_gain"
    threshold: float
    regrid: str | None = None  # compare the map regridded on this pipeline's positions


@dataclass(frozen=True)
class Result:
    check: Check
    value: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.value) and self.value >= self.check.threshold)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def checks(sim: Simulation) -> list[Check]:
    out = []
    if "counters" in sim.pipelines:
        out += [Check("counters/transmission", "sample thickness", "pearson", 0.99),
                Check("counters/it_norm", "exp(-mu thickness)", "pearson", 0.99),
                Check("counters/xbic_norm", "charge collection (Si grains)", "pearson", 0.99),
                Check("counters/xeol_norm", "luminescence yield (NaCl grains)", "pearson", 0.99)]
    if "position" in sim.pipelines:
        out += [Check("position/samx", "true x (vs raw encoder)", "rms_gain", 10.0),
                Check("position/samy", "true y (vs raw encoder)", "rms_gain", 10.0)]
        if "counters" in sim.pipelines and sim.pattern.slow is not None:
            out.append(Check("counters/transmission", "thickness on the nominal grid", "pearson", 0.99,
                             regrid="position"))
    if "xrf" in sim.pipelines:
        out += [Check(f"xrf/{e}_norm", f"{e} areal density", "pearson", 0.98) for e in ELEMENTS]
    if "xrd" in sim.pipelines:
        out += [Check(f"xrd/{p.name}_norm", f"{p.name} phase fraction", "pearson", 0.98) for p in PHASES]
    if "dpc" in sim.pipelines:
        out += [Check("dpc/gradient_x", "dphi/dx", "pearson", 0.95),
                Check("dpc/gradient_y", "dphi/dy", "pearson", 0.95),
                Check("dpc/bright_field_norm", "exp(-mu thickness)", "pearson", 0.99)]
        if sim.pattern.slow is not None:
            out.append(Check("dpc/phase", "phase (integrated in the sink)", "pearson", 0.9))
    return out


def _expected(truth: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What each Pearson-checked product should be proportional to, from the phantom's truth maps."""
    fractions = np.stack([truth[f"phase_{p.name}"] for p in PHASES], axis=-1)
    absorption = np.exp(-CounterModel.mu_per_um * truth["thickness_um"])
    known = {
        "counters/transmission": truth["thickness_um"],
        "counters/it_norm": absorption,
        "counters/xbic_norm": xbic_efficiency(fractions),
        "counters/xeol_norm": xeol_yield(fractions),
        "dpc/gradient_x": truth["dphase_dx"],
        "dpc/gradient_y": truth["dphase_dy"],
        "dpc/bright_field_norm": absorption,
        "dpc/phase": truth["phase_rad"],
        **{f"xrf/{e}_norm": truth[f"{e}_ug_cm2"] for e in ELEMENTS},
        **{f"xrd/{p.name}_norm": truth[f"phase_{p.name}"] for p in PHASES},
    }
    return known


def evaluate(sim: Simulation, fetch: Fetch) -> list[Result]:
    """Every check of ``sim``, measured on the products ``fetch`` returns."""
    results = []
    truth = sim.truth()
    wanted = checks(sim)
    expected = {None: _expected(truth)}
    if any(c.regrid for c in wanted):
        expected["grid"] = _expected(sim.truth_on_grid())
    for check in wanted:
        if check.measure == "rms_gain":
            axis = check.product.split("/", 1)[1]
            corrected = fetch(check.product, None)
            encoder = corrected + fetch(f"{check.product}_encoder_error", None)
            true = truth["x_um" if axis == "samx" else "y_um"]
            raw = np.sqrt(np.nanmean((encoder - true) ** 2))
            fixed = np.sqrt(np.nanmean((corrected - true) ** 2))
            results.append(Result(check, float(raw / fixed) if fixed > 0 else float("inf")))
        else:
            reference = expected["grid" if check.regrid else None][check.product]
            results.append(Result(check, pearson(fetch(check.product, check.regrid), reference)))
    return results
