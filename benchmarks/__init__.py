"""The benchmarks: one script per fused op, the training step, the input pipeline, and run_all.

Each script runs as users type it, from the repository root or by its full path from anywhere:
``python benchmarks/bench_attention.py --quick`` (``python -m benchmarks.bench_attention`` from the
root works too: this file makes the folder a package for ``-m``). The scripts import only the
installed package; their shared plumbing is ``vit_fast.benchmarking``. Every script has the same
shape:

    main(argv=None) -> int     parse arguments, run one path, write JSON; 0 on success, 1 on failure
    run_gpu(args) -> dict      on a CUDA GPU: time every provider (the JSON payload)
    run_cpu(args) -> dict      without one: a correctness smoke or CPU measurement, nothing GPU-timed

The baselines ("reference", "torch", "torch.compile") are the backends of ``vit_fast.ops``,
never re-implemented here, so a benchmark always measures what the model runs.
"""
