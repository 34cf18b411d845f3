"""A float32 exp that vectorises: numba calls libm's expf once per element otherwise."""

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True, inline="always")
def exp_parts(t):
    """exp(t) = mantissa * 2**k for t in [-87, 88], as (mantissa, k).

    Cody-Waite range reduction plus Cephes' degree-6 polynomial (~1 ulp). The caller builds
    2**k in the exponent bits of an int32 ((k + 127) << 23) and reads it back as float32,
    which keeps the loop free of calls so LLVM vectorises it.
    """
    k = np.floor(t * np.float32(1.44269504) + np.float32(0.5))
    r = t - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return p * r * r + r + np.float32(1.0), np.int32(k)
