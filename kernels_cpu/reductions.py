"""Row reductions in a fixed order that still vectorise.

The quantization and rmsnorm prologues must give the same bits wherever they are inlined (see
`exact_math`), so they cannot let LLVM reorder a float sum or max, and a loop-carried float
reduction in IEEE order runs one element per add latency: at 16 tokens those prologues took
a third of a small linear. Here the order is spelled out instead: eight independent partial
sums (which the SLP vectoriser packs into one vector), and a maximum taken on the integer bits
of |x|, which orders non-negative floats exactly as their values and vectorises as integers.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from kernels_cpu.exact_math import EXACT_MATH


@intrinsic
def _abs_bits(typingctx, x):
    """The bits of |x| for a float32 x, as an int32 (sign bit cleared)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], ir.IntType(32))
        return builder.and_(bits, ir.Constant(ir.IntType(32), 0x7FFFFFFF))

    return types.int32(x), codegen


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bits are the int32 `bits`."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(bits), codegen


@njit(cache=True, inline="always")
def abs_max(x: np.ndarray) -> np.float32:
    """max |x| of a float32 row (0 for an empty one), exact. A NaN anywhere gives a NaN: its
    bits exceed those of every number."""
    peak = np.int32(0)
    for i in range(x.shape[0]):
        peak = max(peak, _abs_bits(x[i]))
    return _float_from_bits(peak)


@njit(cache=True, fastmath=EXACT_MATH, inline="always")
def sum_squares(x: np.ndarray) -> np.float32:
    """sum(x * x) of a float32 row in float32: element i goes to partial sum i % 8 (its last
    len % 8 elements are added at the end), and the partials are summed pairwise."""
    n = x.shape[0]
    whole = n - n % 8
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    for i in range(0, whole, 8):
        s0 += x[i] * x[i]
        s1 += x[i + 1] * x[i + 1]
        s2 += x[i + 2] * x[i + 2]
        s3 += x[i + 3] * x[i + 3]
        s4 += x[i + 4] * x[i + 4]
        s5 += x[i + 5] * x[i + 5]
        s6 += x[i + 6] * x[i + 6]
        s7 += x[i + 7] * x[i + 7]
    total = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for i in range(whole, n):
        total += x[i] * x[i]
    return total
