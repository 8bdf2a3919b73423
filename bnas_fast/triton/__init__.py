"""Triton kernels for CUDA tensors; each submodule imports triton only when it is first used."""
