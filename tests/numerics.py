"""Error measures the numerics tests share, in float64."""

import numpy as np


def rel_err(a, b) -> float:
    """Relative Frobenius error ||a - b|| / ||b|` (b = 0: the absolute norm over 1e-30)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel_err(a, b) -> float:
    """Worst element's error relative to the largest reference magnitude, max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
