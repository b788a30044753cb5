"""Tensor math for adapters: pure torch references, Triton kernels beside them, and one C kernel
(the fused CPU merge of bf16 weights, merge_cpu.c). No Django."""
