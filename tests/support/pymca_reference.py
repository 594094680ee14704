"""Real measured XRF spectra and PyMca's full fit of them, the reference of the
``xrf`` processor's tests (tests/unit/test_xrf_real.py).

The spectra and configurations ship with PyMca5 on PyPI (``pymca5``, in the
``test`` extra), in ``PyMca5/PyMcaData``:

* ``XRFSpectrum.mca``: a thin multi-element standard, Mo-tube excitation at
  17.5 keV, Si detector; fitted with the configuration of PyMca's own test of
  that spectrum (``PyMca5.tests.XrfTest.cfg``, read from the installed package).
* ``Steel.spe`` with ``Steel.cfg``: a thick stainless steel (SRM 1155) at 16 keV.

The reference is PyMca's ``ClassMcaTheory`` full fit (non-linear: it refines
calibration and resolution where the configuration lets it) with the
configuration as shipped. Nothing here feeds the processor but the spectrum
and the configuration text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from io import StringIO

import numpy as np

SPECTRA = ("XRFSpectrum.mca", "Steel.spe")


@dataclass(frozen=True)
class Reference:
    name: str
    counts: np.ndarray  # the measured spectrum, (channels,)
    config_text: str  # the PyMca configuration, as text
    areas: dict[str, float]  # PyMca group ("Fe K", "Fe Ka", "Scatter Peak000") -> fitted area
    sigmas: dict[str, float]
    parameters: dict[str, float]  # the fit's global parameters (Zero, Gain, Noise, Fano, ...)
    chisq: float

    @property
    def line_total(self) -> float:
        return sum(v for k, v in self.areas.items() if not k.startswith("Scatter"))


def data_dir() -> str:
    from PyMca5 import PyMcaDataDir

    return PyMcaDataDir.PYMCA_DATA_DIR


def config_text(name: str) -> str:
    if name == "XRFSpectrum.mca":
        from PyMca5.tests.XrfTest import cfg

        return cfg
    with open(os.path.join(data_dir(), name.rsplit(".", 1)[0] + ".cfg")) as f:
        return f.read()


def counts(name: str) -> np.ndarray:
    from PyMca5.PyMcaIO import specfilewrapper

    return np.asarray(specfilewrapper.Specfile(os.path.join(data_dir(), name))[-1].mca(1), dtype=np.float64)


@lru_cache(maxsize=None)
def reference(name: str) -> Reference:
    """PyMca's full fit of one of the shipped spectra with its configuration (about a second)."""
    from PyMca5.PyMcaIO import ConfigDict
    from PyMca5.PyMcaPhysics.xrf import ClassMcaTheory

    y = counts(name)
    text = config_text(name)
    config = ConfigDict.ConfigDict()
    config.readfp(StringIO(text))
    fit = ClassMcaTheory.ClassMcaTheory()
    config = fit.configure(config)
    fit.setData(np.arange(y.size, dtype=np.float64), y, xmin=config["fit"]["xmin"], xmax=config["fit"]["xmax"])
    fit.estimate()
    _, result = fit.startFit(digest=1)
    groups = result["groups"]
    return Reference(name, y, text, {g: float(result[g]["fitarea"]) for g in groups},
                     {g: float(result[g]["sigmaarea"]) for g in groups},
                     {p: float(v) for p, v in zip(result["parameters"], result["fittedpar"]) if p not in groups},
                     float(result["chisq"]))
