"""numba.cuda kernels for the op set of kernels_cpu; filled in by the CUDA backend issue."""
