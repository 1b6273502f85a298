"""Build and install vit_fast.

    pip install -r requirements.txt
    pip install --no-build-isolation -e ".[test]"

``--no-build-isolation`` lets the build use the torch already installed, the one the package will
run against (building against another torch would produce an extension with the wrong ABI).

The C++/CUDA extension ``vit_fast._C`` (sources in csrc/) is built with ninja:
  * with CUDA kernels when a CUDA toolkit is found and torch is a CUDA build: SASS for sm_80 and
    sm_90 (plus sm_100 and sm_120 when the toolkit's nvcc supports them) and compute_90 PTX, which
    the driver compiles for GPUs newer than every SASS image.
    The toolkit is looked up as $CUDA_HOME, else the toolkit of the ``nvcc`` on PATH, else
    /usr/local/cuda. A GPU is not needed to build.
  * CPU-only otherwise, or when VIT_FAST_CPU_ONLY=1 is set (for example to skip nvcc on a small
    machine that does not need the CUDA kernels).
After editing csrc/, rebuild with the same pip command; vit_fast refuses a stale extension.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent

# Sources of vit_fast._C, relative to this file (setuptools wants relative paths).
CPP_SOURCES = ["csrc/patch_embed.cpp"]
CUDA_SOURCES = ["csrc/patch_embed_cuda.cu"]
# One SASS image per target architecture: A100 (sm_80, also run by sm_86/sm_89 GPUs) and H100
# (sm_90) always; B200 (sm_100) and RTX 50xx (sm_120) when nvcc knows them (CUDA 12.8+).
REQUIRED_SASS = ["80", "90"]
OPTIONAL_SASS = ["100", "120"]
# PTX for forward compatibility: a GPU without a matching SASS image (a future architecture)
# JIT-compiles this at load time instead of failing with "no kernel image is available".
PTX_ARCH = "90"


def read_requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def is_cuda_toolkit(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def find_cuda_home() -> str | None:
    """$CUDA_HOME, else the toolkit of the nvcc on PATH, else /usr/local/cuda; None if none is a toolkit.

    torch.utils.cpp_extension makes its own guess from `which nvcc`, which goes wrong when nvcc is
    a wrapper script (here /usr/local/bin/nvcc, giving /usr/local and a failed -lcudart link):
    a candidate counts only if it holds bin/nvcc and include/cuda_runtime.h.
    """
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for candidate in candidates:
        if is_cuda_toolkit(candidate):
            return str(candidate.resolve())
    return None


def nvcc_architectures(cuda_home: str) -> set[str]:
    """The compute capabilities ("80", "90", ...) `nvcc --list-gpu-arch` reports; empty if it cannot say."""
    try:
        listed = subprocess.run(
            [str(Path(cuda_home) / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {line.strip().removeprefix("compute_") for line in listed.split() if line.startswith("compute_")}


def cuda_arch_flags(cuda_home: str) -> tuple[list[str], list[str]]:
    """(-gencode flags, SASS architectures): the required SASS, the optional SASS nvcc supports, the PTX."""
    supported = nvcc_architectures(cuda_home)
    sass = REQUIRED_SASS + [arch for arch in OPTIONAL_SASS if arch in supported]
    flags = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in sass]
    flags.append(f"-gencode=arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}")
    return flags, sass


def extension_modules():
    cpu_only = os.environ.get("VIT_FAST_CPU_ONLY", "0") not in ("", "0")
    cuda_home = None if cpu_only else find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        sys.exit(
            f"vit_fast: building the C++/CUDA extension needs PyTorch at build time ({exc}).\n"
            "Install the requirements first, then build against that torch without build isolation:\n"
            "    pip install -r requirements.txt\n"
            "    pip install --no-build-isolation -e ."
        )

    # -O3 and no debug info keep the objects small and the build fast (-g0 comes last: it wins
    # over a -g that Python's own CFLAGS may carry).
    cxx_flags = ["-O3", "-g0"]
    with_cuda = cuda_home is not None and torch.version.cuda is not None
    if with_cuda:
        arch_flags, sass = cuda_arch_flags(cuda_home)
        print(
            f"vit_fast: building vit_fast._C with CUDA kernels (toolkit {cuda_home}, SASS "
            f"{' + '.join('sm_' + a for a in sass)}, PTX compute_{PTX_ARCH})"
        )
        ext = CUDAExtension(
            "vit_fast._C",
            CPP_SOURCES + CUDA_SOURCES,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", *arch_flags]},
        )
    else:
        reason = (
            "VIT_FAST_CPU_ONLY is set" if cpu_only
            else "no CUDA toolkit found" if cuda_home is None
            else f"torch {torch.__version__} is not a CUDA build"
        )
        print(f"vit_fast: building vit_fast._C for the CPU only ({reason})")
        ext = CppExtension("vit_fast._C", CPP_SOURCES, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="vit_fast",
    version="0.1.0",
    description="A Vision Transformer for CIFAR-100 with fused Triton and CUDA kernels",
    python_requires=">=3.10",
    packages=["vit_fast", "vit_fast.augment", "vit_fast.fused", "vit_fast.kernels"],
    # Device code lives at the top level (kernels/, csrc/) but is imported through the package:
    # a top-level import name "kernels" would collide with the PyPI package of that name.
    package_dir={"vit_fast": "vit_fast", "vit_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=read_requirements("requirements.txt"),
    # "export": what `python -m vit_fast.export` needs beyond torch (safetensors, ONNX); the tests
    # exercise every format, so the test extra holds it too.
    extras_require={"test": read_requirements("requirements-test.txt") + read_requirements("requirements-export.txt"),
                    "export": read_requirements("requirements-export.txt")},
    entry_points={"console_scripts": ["vit-fast-train = vit_fast.train:main",
                                      "vit-fast-export = vit_fast.export:main"]},
)
