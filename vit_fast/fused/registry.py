"""The one list of fused ops: ``OPS``. Adding an op means adding its ``FusedOp`` here.

Everything that enumerates the fused ops is derived from ``OPS``:

- ``vit_fast.aot.REPORT_OPS`` (``python -m vit_fast.aot --op <name>``): the Triton ops' modules;
- ``benchmarks/run_all.py``'s ``PARITY_TESTS`` (``parity_tests()``) and ``OP_BENCHMARKS``
  (``benchmark_scripts()``);
- ``tests/test_fused_model_aot.py``'s ``_NOT_TRITON`` (``registered_ops("cuda")``) and
  ``_BACKWARD_OF`` (``backward_of()``).

``tests/test_registry.py`` checks ``OPS`` against what is actually registered under
``torch.ops.vit_fast`` (every registered op listed, every listed op registered), that every file
named here exists and every reference resolves, and that the op table of docs/kernels.md agrees.

This module imports nothing but the standard library, so ``benchmarks/run_all.py`` (run by path)
and ``vit_fast.aot`` read it without importing torch, Triton or the extension.

Public API:
    FusedOp                               one op: its names, module, kernel kind, files, references
    OPS                                   every fused op, in the order of docs/kernels.md's table
    MODEL_TESTS                           the whole fused model's test files (not one op's)
    registered_ops(kind=None) -> tuple    every registered op name (without ``vit_fast::``)
    backward_of() -> dict                 backward op -> the forward ops it differentiates
    parity_tests() -> tuple               each op's test file, then MODEL_TESTS
    benchmark_scripts() -> tuple          each op's benchmark script (ops that have one)
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("triton", "cuda")


@dataclass(frozen=True)
class FusedOp:
    """One fused op, as laid out in CONTRIBUTING.md.

    ``name``: the op's name (its module's, ``python -m vit_fast.aot --op <name>``);
    ``module``: the module registering it (``vit_fast.fused.<name>``);
    ``registered``: (forward, backward) pairs of the ``vit_fast::`` ops it registers, backward
    None for a forward without autograd (a backward may serve several forwards);
    ``kind``: where its kernels are, "triton" (``kernels/<name>.py``) or "cuda" (``csrc/``);
    ``kernel_file``: that file (for a CUDA op, the kernels' .cu file);
    ``test``: its test file; ``benchmark``: its benchmark script, or None;
    ``references``: the plain-PyTorch functions it is tested against, as importable dotted names.
    """

    name: str
    module: str
    registered: tuple[tuple[str, str | None], ...]
    kind: str
    kernel_file: str
    test: str
    benchmark: str | None
    references: tuple[str, ...]

    @property
    def forwards(self) -> tuple[str, ...]:
        return tuple(forward for forward, _ in self.registered)

    @property
    def backwards(self) -> tuple[str, ...]:
        """Its backward ops, each once, in order."""
        return tuple(dict.fromkeys(backward for _, backward in self.registered if backward is not None))

    @property
    def op_names(self) -> tuple[str, ...]:
        """Every op it registers (forwards, then backwards), without the ``vit_fast::`` prefix."""
        return (*self.forwards, *self.backwards)


OPS: tuple[FusedOp, ...] = (
    FusedOp("layernorm", "vit_fast.fused.layernorm",
            (("layer_norm", "layer_norm_backward"), ("add_layer_norm", "layer_norm_backward")),
            "triton", "kernels/layernorm.py", "tests/test_layernorm.py", "benchmarks/bench_layernorm.py",
            ("vit_fast.reference.layer_norm", "vit_fast.reference.add_layer_norm")),
    FusedOp("attention", "vit_fast.fused.attention",
            (("attention", "attention_backward"), ("attention_packed", "attention_packed_backward")),
            "triton", "kernels/attention.py", "tests/test_attention.py", "benchmarks/bench_attention.py",
            ("vit_fast.reference.attention", "vit_fast.reference.attention_packed")),
    FusedOp("mlp", "vit_fast.fused.mlp", (("mlp", "mlp_backward"),),
            "triton", "kernels/mlp.py", "tests/test_mlp.py", "benchmarks/bench_mlp.py", ("vit_fast.reference.mlp",)),
    # The autocast linear of qkv, proj and head: the MLP's matmul kernels (vit_fast/fused/matmul.py
    # holds what the two modules share), tested and benchmarked with the MLP.
    FusedOp("linear", "vit_fast.fused.linear", (("linear", "linear_backward"),),
            "triton", "kernels/mlp.py", "tests/test_mlp.py", "benchmarks/bench_mlp.py", ("vit_fast.reference.linear",)),
    # The torch backend's loss, F.cross_entropy(logits.float(), ...), is the reference; the
    # cost of its one small kernel each way is in `python -m vit_fast.cost`.
    FusedOp("cross_entropy", "vit_fast.fused.cross_entropy", (("cross_entropy", "cross_entropy_backward"),),
            "triton", "kernels/cross_entropy.py", "tests/test_cross_entropy.py", None,
            ("torch.nn.functional.cross_entropy",)),
    # The data phase's kernels: no autograd, no benchmark of their own (their cost is in
    # `python -m vit_fast.cost`, the pipeline's throughput in benchmarks/bench_data.py).
    FusedOp("augment_draw", "vit_fast.fused.augment_draw", (("augment_draw", None),),
            "triton", "kernels/augment_draw.py", "tests/test_fused_augment_draw.py", None,
            ("vit_fast.augment.draws.counter_draws",)),
    FusedOp("augment_policy", "vit_fast.fused.augment_policy", (("augment_policy", None),),
            "triton", "kernels/augment_policy.py", "tests/test_fused_augment_policy.py", None,
            ("vit_fast.augment.pipeline.apply_crop_flip", "vit_fast.augment.policies.Policy.apply")),
    FusedOp("augment_finish", "vit_fast.fused.augment_finish", (("augment_finish", None),),
            "triton", "kernels/augment_finish.py", "tests/test_fused_augment_finish.py", None,
            ("vit_fast.augment.erasing.apply_erasing", "vit_fast.augment.mixing.apply_mix",
             "vit_fast.augment.mixing.smooth_targets")),
    FusedOp("patch_embed", "vit_fast.fused.patch_embed", (("patch_embed", "patch_embed_backward"),),
            "cuda", "csrc/patch_embed_cuda.cu", "tests/test_patch_embed.py", "benchmarks/bench_patch_embed.py",
            ("vit_fast.reference.patch_embed",)),
)

# Tests of the whole fused model rather than of one op: run with the ops' tests as the parity suite.
MODEL_TESTS = ("tests/test_fused_model.py", "tests/test_fused_model_aot.py")


def registered_ops(kind: str | None = None) -> tuple[str, ...]:
    """Every ``vit_fast::`` op name the fused ops register (of ``kind``, "triton" or "cuda", if given)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    return tuple(name for op in OPS if kind in (None, op.kind) for name in op.op_names)


def backward_of() -> dict[str, tuple[str, ...]]:
    """{backward op: the forward ops whose autograd calls it}."""
    forwards: dict[str, tuple[str, ...]] = {}
    for op in OPS:
        for forward, backward in op.registered:
            if backward is not None:
                forwards[backward] = (*forwards.get(backward, ()), forward)
    return forwards


def parity_tests() -> tuple[str, ...]:
    """The parity suite: every op's test file, then the fused model's (``MODEL_TESTS``)."""
    return (*(op.test for op in OPS), *MODEL_TESTS)


def benchmark_scripts() -> tuple[str, ...]:
    """Every op's benchmark script (a path from the repository root), for ops that have one."""
    return tuple(op.benchmark for op in OPS if op.benchmark is not None)
