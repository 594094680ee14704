"""The simulated beamline: a phantom sample, the detectors that image it, and
the scan driver that plays the control system (docs/simulated-beamline.md)."""
