"""The benchmarks: one script per fused op, the training step, the input pipeline, and run_all.

Run from the repository root as modules, e.g. ``python -m benchmarks.bench_attention --quick``
(``python benchmarks/bench_attention.py`` works too where the repository root is importable, for
example with ``PYTHONPATH=.``). Every script has the same shape:

    main(argv=None) -> int     parse arguments, run one path, write JSON; 0 on success, 1 on failure
    run_gpu(args) -> dict      on a CUDA GPU: time every provider (the JSON payload)
    run_cpu(args) -> dict      without one: a correctness smoke or CPU measurement, nothing GPU-timed

The baselines ("reference", "torch", "torch.compile") are the backends of ``vit_fast.ops``,
never re-implemented here, so a benchmark always measures what the model runs.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the smokes run the Triton kernels in the interpreter, which must be chosen
    # before triton is first imported; every benchmark module imports this package first.
    os.environ.setdefault("TRITON_INTERPRET", "1")
