"""Triton kernels, one op per file; shipped in the wheel as `cascade_rt.kernels`."""
