"""Every Triton kernel launch of a fused training step compiles for sm_80 and sm_90 without spills.

Issue 7's ahead-of-time requirement, for each preset in ``vit_fast.PRESETS`` at batch sizes 128
and 512 in fp16 and bf16. The launches are not listed by hand: one training step (forward and
backward) of the fused model runs on fake tensors (shapes and dtypes, no data, no kernels) and
records every ``vit_fast`` op it dispatches; each recorded op is then turned into the kernel
launches its launcher would make on a GPU (``aot_launches`` of the op's module, built by the same
code that launches). So a change to the model, to an op's arguments or to a launcher's config
choice changes what this test compiles.

Two ways of running in 16 bits are traced: training under ``torch.autocast`` with fp32
parameters (what ``python -m vit_fast.train`` does on a GPU; LayerNorm and the MLP take the fp32
parameters and the fp32 residual stream and convert in registers, with the presets' stochastic
depth inside their epilogues), and a model converted with ``model.to(dtype)`` (everything in fp16
or bf16).

The patch embedding is CUDA C++, not Triton: its sm_80/sm_90 zero-spill check lives in
tests/test_patch_embed.py.
"""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vit_fast import PRESETS
from vit_fast.fused import attention, layernorm, linear, mlp, registry
from vit_fast.model import ViTClassifier

pytest.importorskip("triton", reason="Triton is needed to compile kernels ahead of time")

BATCH_SIZES = (128, 512)
DTYPES = (torch.float16, torch.bfloat16)
# From the one list of fused ops: the ops with no Triton kernel of their own (the CUDA C++ patch
# embedding, see the docstring), and the backward ops, whose launches come with their forward
# op's aot_launches (checked below).
_NOT_TRITON = set(registry.registered_ops("cuda"))
_BACKWARD_OF = registry.backward_of()


class _FusedOpRecorder(TorchDispatchMode):
    """Records (op name, args) of every ``vit_fast`` op dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vit_fast":
            self.calls.append((func.overloadpacket.__name__, args))
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=None)
def _initialised_model(preset: str) -> ViTClassifier:
    # Stochastic depth as the CLI's default (--drop-path 0.1) sets it: block 0 runs without a
    # scale, the others with one, so both epilogue variants are traced.
    return ViTClassifier(PRESETS[preset].replace(drop_path=0.1), backend="fused").train()


def _training_step_calls(preset: str, batch: int, dtype: torch.dtype, autocast: bool = True) -> list[tuple[str, tuple]]:
    """The vit_fast ops of one forward + backward of the fused model, on fake tensors: under
    autocast with fp32 parameters, or with the model converted to ``dtype``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = PRESETS[preset]
    model = copy.deepcopy(_initialised_model(preset))
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    for module in model.modules():  # real weights -> fake tensors of the same shapes, in dtype
        for name, param in module._parameters.items():
            weights = param.detach() if autocast else param.detach().to(dtype)
            module._parameters[name] = torch.nn.Parameter(fake_mode.from_tensor(weights))
    recorder = _FusedOpRecorder()
    # Fake tensors reach only the ops' fake implementations, which check metadata and never ask
    # whether Triton could run here: no interpreter is needed on these CPU fakes.
    with fake_mode, recorder:
        images = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size,
                             dtype=torch.float32 if autocast else dtype)
        labels = torch.randint(cfg.num_classes, (batch,))
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
    return recorder.calls


def _launches_of(op: str, args: tuple) -> list:
    """The GPU kernel launches (forward and backward) of one recorded forward op."""
    if op == "layer_norm":
        x, weight, bias, _eps, out_dtype = (*args, None)[:5]
        return layernorm.aot_launches(x.numel() // x.shape[-1], x.shape[-1], x.dtype, residual=False,
                                      weight_dtype=weight.dtype, out_dtype=out_dtype, bias=bias is not None)
    if op == "add_layer_norm":
        x, residual, weight, bias, _eps, out_dtype, scale = (*args, None, None)[:7]
        return layernorm.aot_launches(x.numel() // x.shape[-1], x.shape[-1], x.dtype, residual=True,
                                      weight_dtype=weight.dtype, residual_dtype=residual.dtype, out_dtype=out_dtype,
                                      scale=scale is not None, bias=bias is not None)
    if op == "attention_packed":
        B, N, _, H, Dh = args[0].shape
        return attention.aot_launches(B, N, H, Dh, args[0].dtype, packed=True)
    if op == "mlp":
        x, w1, b1, w2, _b2, approximate, residual, scale = (*args, None)[:8]
        return mlp.aot_launches(x.numel() // x.shape[-1], x.shape[-1], w1.shape[0], w2.shape[0], x.dtype,
                                approximate, residual is not None, weight_dtype=w1.dtype,
                                residual_dtype=residual.dtype if residual is not None else None,
                                scale=scale is not None, bias=b1 is not None)
    if op == "linear":  # the projections under autocast (fp32 weights converted in registers)
        x, weight, bias = args
        return linear.aot_launches(x.numel() // x.shape[-1], x.shape[-1], weight.shape[0], x.dtype,
                                   weight.dtype, bias is not None)
    raise AssertionError(f"the fused model dispatches vit_fast::{op}, which this test cannot compile: extend it")


@functools.lru_cache(maxsize=None)
def _model_launches() -> dict:
    """{KernelLaunch.key: (launch, the first (preset, batch, dtype, op) that makes it)}."""
    launches = {}
    for preset in PRESETS:
        for batch in BATCH_SIZES:
            for dtype, autocast in ((d, a) for d in DTYPES for a in (True, False)):
                calls = _training_step_calls(preset, batch, dtype, autocast)
                names = [op for op, _ in calls]
                for backward, forwards in _BACKWARD_OF.items():  # each backward has its forward
                    assert (backward in names) == any(f in names for f in forwards), (preset, backward, names)
                for op, args in calls:
                    if op in _NOT_TRITON or op in _BACKWARD_OF:
                        continue
                    for launch in _launches_of(op, args):
                        mode = "autocast" if autocast else "model.to"
                        where = f"{preset} batch {batch} {str(dtype).removeprefix('torch.')} {mode} vit_fast::{op}"
                        launches.setdefault(launch.key, (launch, where))
    return launches


def _triton_kernel_names(module) -> set[str]:
    return {name for name, obj in inspect.getmembers(module) if hasattr(obj, "arg_names") and name.endswith("_kernel")}


def test_enumeration_reaches_every_kernel():
    """Every kernel of the three Triton modules but attention's unfused delta and dQ and the MLP's
    row_scale_kernel is launched somewhere in a training step, in both dtypes, and the backward's
    layer norms (with and without ds) match their forwards."""
    from vit_fast.kernels import attention as attention_kernels
    from vit_fast.kernels import layernorm as layernorm_kernels
    from vit_fast.kernels import mlp as mlp_kernels

    launches = [launch for launch, _ in _model_launches().values()]
    expected = set().union(*(_triton_kernel_names(m) for m in (layernorm_kernels, attention_kernels, mlp_kernels)))
    assert len(expected) == 12, expected
    # The model applies stochastic depth in add_layer_norm, never inside the MLP op, so the MLP
    # backward's per-row scale (row_scale_kernel, or gelu_bwd_kernel's copy) is not needed here.
    expected -= {"row_scale_kernel"}
    # At 65 tokens one dK/dV program owns every key of a head and computes delta and dQ itself
    # (FUSE_DQ): the preprocess and dQ kernels are never launched by these presets.
    assert all(launch.constexprs["FUSE_DQ"] for launch in launches if launch.kernel == "attention_bwd_dkdv_kernel")
    expected -= {"attention_bwd_dq_kernel", "attention_bwd_preprocess_kernel"}
    for pointer in ("*fp16", "*bf16"):
        reached = {launch.kernel for launch in launches if pointer in launch.signature.values()}
        assert reached == expected, f"{pointer}: not launched: {expected - reached}, unexpected: {reached - expected}"
    calls = _training_step_calls("vit-cifar", 128, torch.float16)
    forward_ln = sorted((tuple(a[0].shape), op == "add_layer_norm") for op, a in calls
                        if op in ("layer_norm", "add_layer_norm"))
    backward_ln = sorted((tuple(a[2].shape), a[1] is not None) for op, a in calls if op == "layer_norm_backward")
    depth = PRESETS["vit-cifar"].depth
    # Block 0's norm1 is a plain LayerNorm; every other one, each norm2 and the final norm add the
    # branch to the stream (ViTEncoder.branches). Each add's stream output feeds the next add but
    # the final norm's (the model reads only its normalisation), so its backward has no ds.
    assert len(forward_ln) == len(backward_ln) == 2 * depth + 1
    assert sum(add for _, add in forward_ln) == 2 * depth and sum(ds for _, ds in backward_ln) == 2 * depth - 1
    assert {shape for shape, _ in forward_ln} == {shape for shape, _ in backward_ln}


def test_every_training_step_launch_compiles_without_spills():
    from vit_fast.aot import TARGETS, compile_launches

    launches = _model_launches()
    results = compile_launches([launch for launch, _ in launches.values()])
    assert len(results) == len(TARGETS) * len(launches)
    failures = []
    for launch, r in results:
        where = f"{launches[launch.key][1]}: {launch.describe()} {launch.signature} sm_{r.capability}"
        if r.spills:
            failures.append(f"{where} spills ({r.spill_bytes} B local, {r.stack_bytes} B stack)")
        if not r.fits_shared_memory:
            failures.append(f"{where} needs {r.shared_bytes} B of shared memory")
    assert not failures, "\n".join(failures)
