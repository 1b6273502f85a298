"""Build and install vit_fast.

    pip install -r requirements.txt
    pip install --no-build-isolation -e ".[test]"

``--no-build-isolation`` lets the build use the torch already installed, the one the package will
run against (building against another torch would produce an extension with the wrong ABI).
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def read_requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


setup(
    name="vit_fast",
    version="0.1.0",
    description="A Vision Transformer for CIFAR-100 with fused Triton and CUDA kernels",
    python_requires=">=3.10",
    packages=["vit_fast", "vit_fast.fused", "vit_fast.kernels"],
    # Device code lives at the top level (kernels/, csrc/) but is imported through the package:
    # a top-level import name "kernels" would collide with the PyPI package of that name.
    package_dir={"vit_fast": "vit_fast", "vit_fast.kernels": "kernels"},
    install_requires=read_requirements("requirements.txt"),
    extras_require={"test": read_requirements("requirements-test.txt")},
    entry_points={"console_scripts": ["vit-fast-train = vit_fast.train:main"]},
)
