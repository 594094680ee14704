"""A phase map from its two gradients: Fourier integration (Frankot-Chellappa).

DPC measures dphi/dx and dphi/dy per point; the phase is the surface whose
gradient best matches both in the least-squares sense. In Fourier space that
surface is ``(-i kx Gx - i ky Gy) / (kx² + ky²)``. The gradient maps are
mirrored into a 2x larger, even-symmetric field first, so that the FFT's
periodicity does not tie opposite edges together. Unmeasured points (NaN)
count as zero gradient. The constant of integration is set so the map's
mean is zero: a DPC phase is relative.
"""

from __future__ import annotations

import numpy as np


def integrate_gradients(gx: np.ndarray, gy: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Phase (rows, cols) from gradients per unit length along columns (x,
    step ``dx``) and rows (y, step ``dy``)."""
    if gx.shape != gy.shape or gx.ndim != 2:
        raise ValueError(f"gradients must be two maps of one shape, not {gx.shape} and {gy.shape}")
    if not (dx and dy):
        raise ValueError("the map's steps must be non-zero")
    gx = np.nan_to_num(np.asarray(gx, np.float64))
    gy = np.nan_to_num(np.asarray(gy, np.float64))
    rows, cols = gx.shape
    # even extension of phi: gx flips sign where x is mirrored, gy where y is
    ex = np.block([[gx, -gx[:, ::-1]], [gx[::-1, :], -gx[::-1, ::-1]]])
    ey = np.block([[gy, gy[:, ::-1]], [-gy[::-1, :], -gy[::-1, ::-1]]])
    kx = 2 * np.pi * np.fft.fftfreq(2 * cols, d=dx)[None, :]
    ky = 2 * np.pi * np.fft.fftfreq(2 * rows, d=dy)[:, None]
    k2 = kx**2 + ky**2
    k2[0, 0] = 1.0
    spectrum = (-1j * kx * np.fft.fft2(ex) - 1j * ky * np.fft.fft2(ey)) / k2
    spectrum[0, 0] = 0.0
    phase = np.real(np.fft.ifft2(spectrum))[:rows, :cols]
    return phase - phase.mean()
