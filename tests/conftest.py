"""Test-suite setup shared by every test module.

Without a GPU, Triton kernels run in the interpreter on CPU tensors; the variable must be set
before triton is first imported, which is why it is set here, at collection time. On a CUDA
machine nothing is set and the same tests run the compiled kernels on the GPU. Either way
``VIT_FAST_NO_KERNEL_TIMING`` is set, so the fused backend runs our kernels for every op unless a test
asks for the library's.

A test that only means something on a GPU carries ``@pytest.mark.gpu(reason=...)``; without CUDA it
is skipped with that reason, and ``python -m pytest -m gpu`` selects exactly those tests on a GPU
machine. (Tests parametrized over ``vit_fast.testing.devices()`` run on the CPU everywhere and on
CUDA where there is one: they are not GPU-only.)
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests run our kernels: "--kernels auto" (the default) then picks ours without timing, on a GPU too;
# a test that wants the library asks for it (vit_fast.kernel_choice).
os.environ.setdefault("VIT_FAST_NO_KERNEL_TIMING", "1")

import pytest  # noqa: E402

from vit_fast.testing import default_device  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        mark = item.get_closest_marker("gpu")
        if mark is not None:
            reason = mark.kwargs.get("reason") or (mark.args[0] if mark.args else "needs a CUDA GPU")
            item.add_marker(pytest.mark.skip(reason=f"no CUDA GPU here: {reason}"))


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
