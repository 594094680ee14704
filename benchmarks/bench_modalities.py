#!/usr/bin/env python
"""The science modalities, each beside its reference, measured in one run.

1. XRF, spectra per second on one core (BLAS limited to one thread): the
   ``xrf`` processor (each model addition on its own, then the defaults)
   against PyMca's ``FastXRFLinearFit`` with its SNIP background (PyPI
   ``pymca5``) on the same Poisson-resampled real spectra (PyMca's measured
   thin standard, 4096 channels) with the same configuration (PyMca's own test
   configuration of that spectrum, read by both). Also how well the two agree
   (Pearson of the major lines' maps).
2. XRD, frames per second: a bare pyFAI ``integrate1d`` loop over frames
   against the same frames through the live ``xrd`` pipeline (master,
   worker, sorter, consumer as separate processes) with one worker. Both
   pay the per-scan set-up (integrator, CSR engine on the first frame).
3. The whole mesh: the ``full`` simulation through all five pipelines with
   two workers each, points per second per pipeline.

Data are generated before the clock starts (the simulator is not measured).

    python benchmarks/bench_modalities.py            # ~3 min
    python benchmarks/bench_modalities.py --quick --json
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # per-core numbers: before numpy is imported

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import report  # noqa: E402 - beside this script

import numpy as np  # noqa: E402

from pipelines.processors import Batch  # noqa: E402
from pipelines.processors.xrf import Xrf  # noqa: E402
from services.ops import mesh  # noqa: E402
from services.sim.agreement import pearson  # noqa: E402
from services.ops.driver import ScanDriver  # noqa: E402
from services.sim.sims import Simulation, make_simulation  # noqa: E402
from services.ops.home import EmbeddedDatabase, home  # noqa: E402
from services.registration import TangoManagerLink  # noqa: E402
from services.scan import parse_scan  # noqa: E402

BLOCK = int(os.environ.get("BENCH_BLOCK", "1"))


class Replay(Simulation):
    """A simulation whose arrays are generated once, before any clock runs."""

    def pregenerate(self) -> "Replay":
        self.frozen = {s: super(Replay, self).arrays(s, 0, self.pattern.points) for s in self.detectors}
        return self

    def arrays(self, stream: str, start: int, stop: int) -> dict[str, np.ndarray]:
        return {n: a[start:stop] for n, a in self.frozen[stream].items()}


def replay(name: str, shape: tuple[int, int]) -> Replay:
    sim = make_simulation(name, shape, snake=True)
    return Replay(**{f: getattr(sim, f) for f in ("name", "pattern", "seed", "phantom", "beam", "stage",
                                                   "detectors", "pipelines")}).pregenerate()


def best_rate(fn, items: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return items / best


# --------------------------------------------------------------------------- XRF

#: (label, settings over the PyMca configuration): each model addition on its own, then the defaults
XRF_VARIANTS = (
    ("lines only (no continuum, no escape)", {"background": {"method": "none"}, "escape": False}),
    ("+ escape peaks", {"background": {"method": "none"}}),
    ("+ map continuum (snip_scan)", {"background": {"method": "snip_scan"}}),
    ("+ map continuum + pile-up", {"background": {"method": "snip_scan"}, "pileup": True}),
    ("+ map continuum + thick-sample matrix", {"background": {"method": "snip_scan"},
                                              "matrix": {"material": {"Fe": 0.7, "Cr": 0.2, "Ni": 0.1},
                                                         "density_g_cm3": 7.9, "thickness_cm": 0.1}}),
    ("default: SNIP of each spectrum", {}),
)


def real_spectra(points: int) -> tuple[np.ndarray, str]:
    """``points`` Poisson resamplings of PyMca's measured thin-standard spectrum
    (PyMca5/PyMcaData/XRFSpectrum.mca, 4096 channels) at 0.2-2 % of its counts
    (1e5 to 1e6 counts per spectrum), and the configuration PyMca's own test fits it with."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support.pymca_reference import config_text, counts

    rng = np.random.default_rng(18)
    weights = rng.uniform(0.002, 0.02, points)
    return rng.poisson(weights[:, None] * counts("XRFSpectrum.mca")[None]).astype(np.uint32), \
        config_text("XRFSpectrum.mca")


def bench_xrf(points: int) -> dict[str, Any]:
    spectra, config = real_spectra(points)
    meta = parse_scan(make_simulation("xrf", (4, 3)).document("bench-xrf", 1))
    batch = Batch(meta, 0, len(spectra), {"sdd/mca": spectra})
    out: dict[str, Any] = {"spectra": len(spectra), "channels": spectra.shape[1], "variants": {}}
    fitted: dict[str, np.ndarray] = {}
    for label, extra in XRF_VARIANTS:
        ours = Xrf()
        ours.start_scan(meta, {"detector": "sdd", "pymca_config": config, **extra})
        fitted = ours.process(batch)  # builds the model, freezes the scan's state
        out["variants"][label] = round(best_rate(lambda: ours.process(batch), len(spectra)))
    out["elements"] = len(ours.elements)
    out["components"] = len(ours.names)
    try:
        from PyMca5.PyMcaIO import ConfigDict
        from PyMca5.PyMcaPhysics.xrf.FastXRFLinearFit import FastXRFLinearFit
    except ImportError:
        out["pymca"] = "not installed (make bench installs pymca5)"
        return out
    import io

    pymca_config = ConfigDict.ConfigDict()
    pymca_config.readfp(io.StringIO(config))
    pymca_config["fit"]["stripalgorithm"] = 1  # FastXRFLinearFit takes SNIP only; the width is the file's
    fast = FastXRFLinearFit()
    fast.setFitConfiguration(pymca_config)
    cube = spectra.reshape(1, len(spectra), -1).astype(np.float64)
    result: dict[str, Any] = {}

    def pymca() -> None:
        result["r"] = fast.fitMultipleSpectra(y=cube, weight=0, refit=0, concentrations=0)

    pymca_rate = best_rate(pymca, len(spectra), repeats=2)
    names = result["r"].labels("parameters")
    images = result["r"]["parameters"]
    agreement = {}
    for group in ("Fe K", "Zn K", "Sr K", "Pb L"):
        element = group.split()[0]
        key = element if len(ours.settings["elements"][element]) == 1 else group.replace(" ", "_")
        agreement[group] = round(pearson(np.asarray(images[names.index(group)]).ravel(), fitted[key]), 4)
    default = out["variants"][XRF_VARIANTS[-1][0]]
    best = out["variants"][XRF_VARIANTS[2][0]]
    out.update({"pymca_per_s": round(pymca_rate), "ratio_default": round(default / pymca_rate, 2),
                "ratio_map_continuum": round(best / pymca_rate, 2), "pearson_vs_pymca": agreement})
    return out


# --------------------------------------------------------------------------- the mesh


def mesh_up() -> tuple[mesh.MeshSpec, mesh.LocalLauncher, Path, TangoManagerLink]:
    os.environ["TANGOMESH_HOME"] = tempfile.mkdtemp(prefix="tangomesh-bench-")
    root = home()
    os.environ.pop("TANGO_HOST", None)
    os.environ["TANGO_HOST"] = EmbeddedDatabase(root).start()
    spec = mesh.MeshSpec.load(mesh.DEFAULT_MESH)
    launcher = mesh.LocalLauncher(root)
    mesh.up(spec, launcher, root)
    return spec, launcher, root, TangoManagerLink(spec.topology_device)


def bench_xrd(link: TangoManagerLink, points: int) -> dict[str, Any]:
    from services.physics.pyfai import integrator

    sim = replay("xrd", (points // 20, 20))
    frames = sim.frozen["eiger"]["image"]
    settings = sim.pipelines["xrd"].settings
    method = ("bbox", "csr", "cython")
    integrator(settings["geometry"])  # pyFAI imported before the clock, as the workers preload it

    def bare() -> None:  # per scan, like the processor: a new integrator, its CSR engine built on frame 1
        ai = integrator(settings["geometry"])
        for frame in frames:
            ai.integrate1d(frame, settings["npt_radial"], unit=settings["unit"], method=method)

    bare_rate = best_rate(bare, len(frames), repeats=2)
    driver = ScanDriver.for_data(sim, link, pipelines=["xrd"])
    try:
        outcome = driver.run(sim, f"bench-xrd-{time.time_ns()}", 1, rate=0.0, block=BLOCK, timeout=600)
    finally:
        driver.close()
    mesh_rate = points / outcome.wall_s
    return {"frames": len(frames), "shape": list(frames.shape[1:]), "bare_pyfai_per_s": round(bare_rate, 1),
            "pipeline_per_s": round(mesh_rate, 1), "overhead_pct": round(100 * (1 - mesh_rate / bare_rate), 1),
            "lossless": outcome.lossless}


def bench_full(spec, launcher, root, link: TangoManagerLink, points: int) -> dict[str, Any]:
    for pipeline in ("counters", "position", "xrf", "xrd", "dpc"):
        mesh.scale_workers(spec, pipeline, 2, launcher, root)
    time.sleep(2.0)  # new workers find their masters
    sim = replay("full", (points // 40, 40))
    driver = ScanDriver.for_data(sim, link)
    try:
        outcome = driver.run(sim, f"bench-full-{time.time_ns()}", 2, rate=0.0, block=1, timeout=900)
    finally:
        driver.close()
    return {"points": points, "workers_per_pipeline": 2, "wall_s": round(outcome.wall_s, 2),
            "points_per_s": round(points / outcome.wall_s, 1), "MiB_sent": round(outcome.sent_bytes / 2**20),
            "lossless": outcome.lossless,
            "per_pipeline": {p: {"events_per_s": s["events_per_s"], "latency_p50_ms": s.get("latency_ms", {}).get("p50")}
                             for p, s in outcome.per_pipeline.items()}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"config": {"python": platform.python_version(), "numpy": np.__version__,
                                          "cpus": os.cpu_count(), "blas_threads": os.environ["OPENBLAS_NUM_THREADS"],
                                          "quick": args.quick}}
    results["xrf"] = bench_xrf(2000 if args.quick else 8000)
    spec, launcher, root, link = mesh_up()
    try:
        results["xrd"] = bench_xrd(link, 400 if args.quick else 2000)
        results["full"] = bench_full(spec, launcher, root, link, 400 if args.quick else 2000)
    finally:
        mesh.down(spec, [launcher])
        EmbeddedDatabase(root).stop()
    return results


def print_tables(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    x = results["xrf"]
    table = Table(title=f"XRF, {x['spectra']} resampled real spectra x {x['channels']} channels, "
                        f"{x.get('elements')} elements ({x.get('components')} components), one core")
    for column in ("", "spectra/s"):
        table.add_column(column, justify="right" if column else "left")
    for label, rate in x["variants"].items():
        table.add_row(f"tangomesh xrf process(): {label}", str(rate))
    table.add_row("PyMca FastXRFLinearFit (SNIP, unweighted)", str(x.get("pymca_per_s", x.get("pymca"))))
    console.print(table)
    if "ratio_default" in x:
        console.print(f"vs PyMca: default {x['ratio_default']}x, map continuum {x['ratio_map_continuum']}x; "
                      f"Pearson with PyMca's maps: {x['pearson_vs_pymca']}")
    d = results["xrd"]
    console.print(f"XRD {d['frames']} frames {d['shape']}: bare pyFAI {d['bare_pyfai_per_s']} frames/s, through the "
                  f"pipeline (1 worker) {d['pipeline_per_s']} frames/s: overhead {d['overhead_pct']} % "
                  f"(lossless: {d['lossless']})")
    f = results["full"]
    console.print(f"full simulation, {f['points']} points, 2 workers per pipeline: {f['points_per_s']} points/s "
                  f"({f['MiB_sent']} MiB, lossless: {f['lossless']}); per pipeline {f['per_pipeline']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer points")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    return report(args, run(args), print_tables)


if __name__ == "__main__":
    sys.exit(main())
