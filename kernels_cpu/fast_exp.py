"""A float32 exp that vectorises: numba calls libm's expf once per element otherwise."""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@njit(cache=True, fastmath=True, inline="always")
def exp_parts(t):
    """exp(t) = mantissa * 2**k for t in [-87, 88], as (mantissa, k).

    Cody-Waite range reduction plus Cephes' degree-6 polynomial (~1 ulp). The caller
    multiplies by `pow2(k)`, which keeps the loop free of calls so LLVM vectorises it.
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


@intrinsic
def pow2(typingctx, k):
    """2**k as float32 for an integer k in [-126, 127]: (k + 127) << 23 read as a float.

    A bitcast in registers rather than an int32 array read back through a float32 view,
    so callers need no scratch array and the loop still vectorises.
    """
    if not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        k32 = context.cast(builder, args[0], signature.args[0], types.int32)
        bits = builder.shl(builder.add(k32, ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(k), codegen
