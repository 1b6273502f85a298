"""Registered torch ops (namespace ``vit_fast``) around our kernels, one module per op.

Each op module validates inputs, allocates outputs, picks a launch configuration, launches the
kernels of ``vit_fast.kernels`` (Triton) or ``vit_fast._C`` (C++/CUDA), and registers fake
(meta) and autograd implementations so the ops work under ``torch.compile(fullgraph=True)``.
What the Triton ops share (the ``Launch`` object, the interpreter switch, accumulation and
dot-precision rules, device and dtype checks) lives in ``launch.py``, and what only some share in a
module of its own (``matmul.py``: the autocast linear's and the MLP's); CONTRIBUTING.md gives the
layout every op module follows. ``registry.py`` holds the one list of the ops (``OPS``), from
which the tools and tests that enumerate them derive their lists. Modules are imported on first
use, so a missing compiler or extension only matters to its op.
"""
