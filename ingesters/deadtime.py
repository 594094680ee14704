"""Xspress3 dead-time correction from the raw scalers, vectorised over channels (and frames).

Why here and not from the stream's own numbers: the MAX IV ``xspress3-streamer``
sends an ``ocr`` that is ``AllGood / ClockTicks / 80e6``, mis-scaled by
(80e6)² (reference notes on detector streams, section 3), so every rate is
recomputed from the counters the hardware counted. The formula reproduces
the device's own ``dtc`` (checked on the three public recordings in
``tests/unit/test_xspress_decoder.py``):

* ``busy  = ResetTicks + AllEvents × (event_width + 1)`` clock ticks in which the
  channel could not take an event,
* ``dtc   = ClockTicks / (ClockTicks − busy)``: the factor that corrects counts,
* ``live_time = ClockTicks / 80 MHz``: the channel's counting time (what the
  reference notes call the live time; the dead part of it is ``busy``),
* ``ocr   = AllGood / live_time``, ``icr = AllEvents / ((ClockTicks − busy) / 80 MHz)``.

A channel whose busy ticks reach its clock ticks (saturated, or a zero
gate) has no defined correction: its ``dtc`` and ``icr`` are NaN (and its
``ocr`` too when it counted no time), never a division by zero; the spectra
still travel.
"""

from __future__ import annotations

import numpy as np

CLOCK_HZ = 80e6  # the Xspress3 scaler clock


def dead_time(all_events: np.ndarray, all_good: np.ndarray, clock_ticks: np.ndarray, reset_ticks: np.ndarray,
              event_width: np.ndarray) -> dict[str, np.ndarray]:
    """``icr``, ``ocr`` (counts/s), ``dtc`` (factor >= 1) and ``live_time`` (s), float64, each the
    shape of the inputs (per channel, or per frame and channel)."""
    events = np.asarray(all_events, np.float64)
    clock = np.asarray(clock_ticks, np.float64)
    busy = np.asarray(reset_ticks, np.float64) + events * (np.asarray(event_width, np.float64) + 1.0)
    live_ticks = clock - busy
    with np.errstate(divide="ignore", invalid="ignore"):
        defined = live_ticks > 0
        dtc = np.where(defined, clock / live_ticks, np.nan)
        icr = np.where(defined, events * CLOCK_HZ / live_ticks, np.nan)
        live_time = clock / CLOCK_HZ
        ocr = np.where(clock > 0, np.asarray(all_good, np.float64) / live_time, np.nan)
    return {"icr": icr, "ocr": ocr, "dtc": dtc, "live_time": live_time}
