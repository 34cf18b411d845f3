"""Warp reductions by register shuffles, on a GPU and under numba's CUDA simulator alike.

The simulator has no warp shuffles, so importing this module under it gives numba.cuda a
`shfl_xor_sync` that exchanges values through the
block's barriers: the kernels are then the same code on both, the shuffle the hardware's on
a GPU. Its one condition, which the kernels keep: every thread of the block reaches each
shuffle (on a GPU, every lane of the warp must).

This module names `shfl_xor_sync` and `jit`, never `cuda`: the simulator swaps a module's
`cuda` global per device-function call, which races between threads in a module other than
the calling kernel's (launch.py), and there is nothing here for it to swap.
"""

from __future__ import annotations

import threading

import numba
import numba.cuda

FULL_MASK = 0xFFFFFFFF  # every lane of the warp takes part
WARP = 32


def simulate_shuffles() -> None:
    """Give the simulator's numba.cuda a `shfl_xor_sync` (it has none)."""
    if not hasattr(numba.cuda, "shfl_xor_sync"):
        numba.cuda.shfl_xor_sync = _simulated_shfl_xor_sync


def _simulated_shfl_xor_sync(mask, value, lane_mask):
    """The value of the thread whose index is this one's xor `lane_mask`: each thread posts
    its value between two barriers of its block, then reads its partner's."""
    thread = threading.current_thread()  # a simulated CUDA thread
    posted = thread._manager.__dict__.setdefault("lamina_shuffle", {})
    thread.syncthreads()  # every thread has read the previous exchange
    posted[thread.thread_id] = value
    thread.syncthreads()
    return posted[thread.thread_id ^ lane_mask]


if numba.config.ENABLE_CUDASIM:
    simulate_shuffles()

from numba.cuda import jit, shfl_xor_sync


@jit(device=True)
def lane_totals(acc, nt, lane):
    """Each of acc[:nt] summed over the warp's lanes by a butterfly of shuffles (every lane
    gets every total); returns token `lane`'s total to lanes below nt. Exact for integers;
    a fixed order for floats."""
    mine = acc[0]
    for j in range(nt):
        total = acc[j]
        offset = WARP // 2
        while offset > 0:
            total += shfl_xor_sync(FULL_MASK, total, offset)
            offset //= 2
        if lane == j:
            mine = total
    return mine
