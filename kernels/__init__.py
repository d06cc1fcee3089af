"""Triton kernels."""
X = 1
