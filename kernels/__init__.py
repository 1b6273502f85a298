"""Triton kernels (forward and backward) of vit_fast; importable as ``vit_fast.kernels``.

Kernels here know nothing of ``nn.Module``: they take tensors' pointers, strides and sizes. Their
launchers, the registered torch ops and autograd live in ``vit_fast.fused``.
"""
