"""Test-suite setup shared by every test module.

Without a GPU, Triton kernels run in the interpreter on CPU tensors; the variable must be set
before triton is first imported, which is why it is set here, at collection time. On a CUDA
machine nothing is set and the same tests run the compiled kernels on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vit_fast.testing import default_device  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    return default_device()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def benchmark_script():
    """``benchmark_script("bench_train")``: benchmarks/bench_train.py loaded by its path, as
    ``python benchmarks/bench_train.py`` finds it (not through a ``benchmarks`` package, which only
    the repository root on ``sys.path`` provides)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
