"""Reading a PyMca fit configuration (``.cfg``) into ``xrf`` processor settings.

Why: a beamline already holds its detectors' calibrations, resolutions,
filters and element lists as PyMca configurations; the mesh reuses them
instead of asking for the same facts again. The file is an INI text
(PyMca's ConfigDict): sections ``[peaks]`` (``Fe = Ka, Kb``), ``[fit]``
(``xmin``/``xmax`` channels, ``energy``/``energyflag``/``energyweight``
lists, ``scatterflag``, ``escapeflag``, ``sumflag``), ``[detector]``
(``zero``, ``gain``, ``noise``, ``fano``, ``detele``), ``[attenuators]``
(``name = enabled, material, density, thickness, funny``; ``Matrix`` adds the
incidence and take-off angles) and ``[materials.<name>]``
(``CompoundList`` / ``CompoundFraction``).

What is read: elements and series, calibration, resolution, the one
excitation energy, the fit range, scatter / escape / pile-up switches, the
detector crystal, the attenuators on the fluorescence path (atmosphere,
window, dead layer, contact, absorber, filters) and the sample matrix.
What is refused, with the reason: several excitation energies, a
multilayer matrix, attenuators with a "funny" factor other than 1.
Beam filters act on the incident beam only, which scales every line alike:
they do not change the fit and are not read.
"""

from __future__ import annotations

import configparser
from typing import Any

import xraylib

#: Attenuators of PyMca's [attenuators] that the fluorescence crosses on its way to the crystal.
PATH_ATTENUATORS = ("atmosphere", "window", "deadlayer", "contact", "absorber", "kapton", "Filter 6", "Filter 7")


def _floats(text: str) -> list[float | None]:
    return [None if v.strip() in ("None", "") else float(v) for v in text.split(",")]


def _read(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # keys keep their case ("Matrix", "CompoundList")
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise ValueError(f"pymca_config is not a PyMca .cfg (INI) text: {exc}") from None
    for section in ("peaks", "fit", "detector"):
        if not parser.has_section(section):
            raise ValueError(f"pymca_config has no [{section}] section")
    return parser


def _material(parser: configparser.ConfigParser, name: str) -> dict[str, float]:
    """A PyMca material by name: its [materials.<name>] composition, else a formula ("Be1", "Si1")."""
    section = f"materials.{name}"
    if parser.has_section(section):
        compounds = [c.strip() for c in parser[section]["CompoundList"].split(",")]
        fractions = [float(f) for f in parser[section]["CompoundFraction"].split(",")]
        if len(compounds) != len(fractions):
            raise ValueError(f"pymca_config [{section}]: {len(compounds)} compounds, {len(fractions)} fractions")
        return dict(zip(compounds, fractions))
    return {name: 1.0}


def _layer(parser: configparser.ConfigParser, key: str) -> tuple[bool, dict[str, Any], list[str]]:
    fields = [f.strip() for f in parser["attenuators"][key].split(",")]
    enabled = len(fields) > 1 and fields[0] not in ("0", "") and fields[1] != "-"
    if not enabled:
        return False, {}, fields
    return True, {"material": _material(parser, fields[1]), "density_g_cm3": float(fields[2]),
                  "thickness_cm": float(fields[3])}, fields


def read_pymca_config(text: str) -> dict[str, Any]:
    """The ``xrf`` settings a PyMca configuration text describes (without ``detector``,
    the stream name, which a PyMca file does not know). ValueError naming what cannot be used."""
    parser = _read(text)
    fit, det = parser["fit"], parser["detector"]
    out: dict[str, Any] = {}
    elements = {}
    for element, series in parser["peaks"].items():
        names = [s.strip() for s in series.split(",") if s.strip()]
        if names:
            elements[element] = names
    if not elements:
        raise ValueError("pymca_config [peaks] names no element")
    out["elements"] = elements
    zero, gain = float(det["zero"]), float(det["gain"])
    out["energy_calibration"] = {"offset_keV": zero, "gain_keV_per_channel": gain}
    out["resolution"] = {"noise_fwhm_keV": float(det["noise"]), "fano": float(det["fano"])}
    energies = _floats(fit.get("energy", "None"))
    flags = _floats(fit.get("energyflag", "1"))
    weights = _floats(fit.get("energyweight", "1"))
    active = [e for i, e in enumerate(energies) if e is not None and (flags[i] if i < len(flags) else 0)
              and (weights[i] if i < len(weights) else 0)]
    if len(active) > 1:
        raise ValueError(f"pymca_config has {len(active)} excitation energies {active} keV; the xrf fit "
                         "takes one (a monochromatic beam): keep the main one")
    if active:
        out["incident_energy_keV"] = float(active[0])
    if "xmin" in fit and "xmax" in fit:
        xmin, xmax = float(fit["xmin"]), float(fit["xmax"])
        out["fit_range_keV"] = [zero + gain * (xmin - 0.5), zero + gain * (xmax + 0.5)]
    flag = lambda key, default="0": fit.get(key, default).strip() not in ("0", "")  # noqa: E731
    scatter = flag("scatterflag") and (_floats(fit.get("energyscatter", "1"))[:1] or [0])[0]
    out["scatter"] = bool(scatter)
    out["escape"] = flag("escapeflag", "1")
    out["pileup"] = flag("sumflag")
    if parser.has_section("attenuators"):
        path = []
        for key in parser["attenuators"]:
            if key in ("Matrix", "Detector") or key.startswith("BeamFilter"):
                continue
            enabled, layer, fields = _layer(parser, key)
            if not enabled:
                continue
            if len(fields) > 4 and float(fields[4]) != 1.0:
                raise ValueError(f"pymca_config attenuator {key!r} has a 'funny' factor {fields[4]} (a mesh "
                                 "filter); the xrf fit models homogeneous layers only")
            path.append(layer)
        if path:
            out["attenuators"] = path
        if "Detector" in parser["attenuators"]:
            enabled, layer, _ = _layer(parser, "Detector")
            if enabled:
                out["detector_crystal"] = layer
        if "Matrix" in parser["attenuators"]:
            enabled, layer, fields = _layer(parser, "Matrix")
            if enabled:
                if fields[1] == "MULTILAYER":
                    raise ValueError("pymca_config has a MULTILAYER matrix; the xrf fit models one layer")
                a_in, a_out = float(fields[4]), float(fields[5])
                out["matrix"] = {**layer, "angle_in_deg": a_in, "angle_out_deg": a_out}
                given = len(fields) > 7 and fields[6] not in ("0", "")
                out["compton_angle_deg"] = float(fields[7]) if given else min(a_in + a_out, 180.0)
    if "detele" in det and "detector_crystal" not in out:
        symbol = det["detele"].strip()  # no crystal given: 0.5 mm of the element, PyMca's default
        z = xraylib.SymbolToAtomicNumber(symbol)
        out["detector_crystal"] = {"material": {symbol: 1.0}, "density_g_cm3": xraylib.ElementDensity(z),
                                   "thickness_cm": 0.05}
    return out
