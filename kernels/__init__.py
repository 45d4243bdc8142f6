"""Triton kernels, one folder per op, each with its torch reference."""
