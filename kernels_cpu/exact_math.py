"""Fast-math flags for row functions whose bits must not depend on where they are inlined.

With `contract` LLVM may fuse a multiply and an add into one FMA, and with `reassoc` reorder a
sum for vectors; both choices depend on the code around the function after inlining. The
rmsnorm and gate prologues run inside both the int8 GEMV and the parallel GEMM, and a batched
step must give the bits of one-by-one steps, so they keep IEEE order and rounding and only
assume no NaN, no infinity and no signed zeros.
"""

EXACT_MATH = {"nnan", "ninf", "nsz"}
