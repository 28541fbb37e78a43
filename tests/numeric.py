"""A float64 central-difference gradient, the yardstick for the layers' own gradients
(tests/test_renorm.py, tests/test_wsconv.py)."""

import numpy as np


def central_difference(f, at, h=1e-6):
    """d f / d at, element by element: (f(at + h) - f(at - h)) / 2h, in float64."""
    grad = np.zeros(at.shape, dtype=np.float64)
    for i in np.ndindex(at.shape):
        up, down = at.astype(np.float64), at.astype(np.float64)
        up[i] += h
        down[i] -= h
        grad[i] = (f(up) - f(down)) / (2 * h)
    return grad
