"""The simulated beamline: a phantom sample, the detectors that image it, the
scans that tie them to pipelines, and the plumbing profiles of the tests and
benchmarks; the scan driver that sends them is services/ops/driver.py
(docs/simulated-beamline.md)."""
