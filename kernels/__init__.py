"""Tensor math for adapters: pure torch references, Triton kernels beside them. No Django."""
