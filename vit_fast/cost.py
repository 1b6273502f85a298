"""A per-step cost account: kernels launched, dtype casts, bytes moved, FLOPs and host syncs of one
training step, per phase, with a roofline estimate per GPU.

    python -m vit_fast.cost                       # the step `python -m vit_fast.train` runs, every backend
    python -m vit_fast.cost --mixup 0.8 --cutmix 1.0 --json cost.json
    python -m vit_fast.cost --pure                # fp32 forward, backward and AdamW only (the old account)

The step as trained (the default) is built by the training CLI's own code (``vit_fast.train``'s
``parse_args`` with its defaults, ``vit_fast.run.setup``, ``vit_fast.step``'s
``epoch_batches``/``next_batch`` and ``train_step``):
a batch drawn by ``DeviceLoader`` with its augmentation (crop, flip; mixup/cutmix when asked),
forward under bf16 autocast, the label-smoothed loss, backward, gradient clipping, AdamW as
``make_optimizer`` builds it and the learning-rate update of ``LRSchedule``. Its four phases are
``step_mod.PHASES``: data, forward_backward, clip, optimizer. The dataset is synthetic data of the
preset's image size and class count (what the data phase does does not depend on the pixels).

What is counted, per phase and per operator:

- launches: a dispatched aten operator counts once (views and allocations are free). A ``vit_fast``
  custom op counts as the kernels its launcher issues at that shape: each Triton op's module (found
  through ``vit_fast.fused.registry``) is asked for its ``launch_plan`` of the call, on the call's
  fake arguments and outputs, for a GPU (``Target(interpret=False, device_type="cuda",
  multiprocessors=132)``), the very function its real implementation runs; any torch operators
  the plan issues (a copy of a strided input) are recorded like any other; the C++ patch embedding
  is asked ``patch_embed.kernel_count``.
- bytes: every kernel reads each distinct tensor it is handed once and writes each output once
  (no cache reuse between kernels; what a kernel re-reads internally is ignored). For a Triton
  launch a tensor argument is written when it is the op's own (not one of its inputs) and no
  earlier kernel of the op wrote it; otherwise it is read. A tensor made inside a custom op and
  read by three of its kernels is read three times, as on the GPU.
- casts: standalone dtype conversions (``aten._to_copy``, or ``copy_`` between floating dtypes),
  kernels of their own that a fused kernel would have folded into its loads or stores.
- FLOPs: products from their shapes (mm, addmm, bmm, baddbmm, convolution and its backward,
  scaled-dot-product attention, our GEMM and attention kernels); anything else one per element written.
- host syncs: ``vit_fast.syncs.count_host_syncs`` over the same step.
- custom-op calls: Python-level calls of ``vit_fast`` ops (each costs a Python dispatch).

It runs on fake tensors (no data, no compute): any preset and batch size, every backend, in
seconds on a CPU; fake tensors need no GPU and no Triton interpreter.

A CPU stands in for the GPU; where that changes the account:

- autocast follows torch's CPU op lists, not CUDA's. Both run the matrix products (linear, addmm,
  mm, bmm, baddbmm, matmul, convolution, scaled_dot_product_attention) in bf16, which is where
  this model's casts come from. CUDA's also forces layer_norm, softmax and log_softmax to fp32
  (checked on this torch: under CUDA autocast a bf16 input comes out fp32, under CPU autocast
  bf16). So on CUDA the torch backend casts each LayerNorm's input up and its output back down
  for the next product (about four more casts per LayerNorm over forward and backward: some 76
  for vit-cifar, not in this account). The reference backend writes LayerNorm and softmax out in
  fp32 itself, and the fused backend calls no autocast-listed op but the products, so their casts
  are CUDA's.
- scaled-dot-product attention runs ``_scaled_dot_product_flash_attention_for_cpu``; CUDA's
  flash or memory-efficient kernels have the same inputs and outputs (one launch forward, one
  backward), so launches and bytes match.
- torch's foreach paths (``clip_grad_norm_``) refuse fake tensors by type; the account lets them
  through (``_foreach_on_fake_tensors``), so clipping runs ``_foreach_norm``/``_foreach_mul_`` as
  on a GPU. A multi-tensor operator (those two, ``_fused_adamw_``) counts once, where CUDA
  launches one kernel per chunk of its tensor lists.
- host syncs: no device-to-host or pageable host-to-device copy can happen on a CPU; the counter
  still sees every scalar read, tensor built from host data and data-dependent shape, which is
  where syncs come from (``vit_fast.syncs``).
- the LayerNorm backward's partial-sum grid follows the GPU's rule, 4 programs per multiprocessor
  of an H100 SXM (132 SMs: 528 programs, so 2 x width x 528 fp32 partial sums, about 0.8 MB at
  width 192, written by one kernel and read by the next); an A100's 108 SMs give 432 programs.

The roofline estimate is a model, not a timing: per kernel max(FLOPs / peak, bytes / bandwidth)
on the named GPU (bf16 dense tensor-core peak for every kernel, so an fp32 product is modelled
too fast), summed ("graph": the step replayed from a CUDA graph), plus, for an uncaptured step
("eager"), host time of LAUNCH_OVERHEAD_S per launch and CUSTOM_OP_CALL_S per custom-op call
(their comments say where the figures come from). The sum is what the estimate reports; a step
with no host sync lets the host run ahead of the GPU, so max(host, graph) is the optimistic
bound. ``benchmarks/bench_train.py`` measures the step on a GPU.

After the account, the GPU-time estimate of ``vit_fast.gpu_time`` (per kernel, from its SASS and
stated hardware figures; ``--no-estimate`` skips it): the graphed step, its forward+backward phase
and the kernels ranked by estimated time, per backend and GPU; also an estimate, not a timing.

The module's parts: ``vit_fast.cost_account`` (the account types, the roofline model and the
tables), ``vit_fast.cost_kernels`` (what each operator and custom-op call costs, and the recorder),
and this module (the step drivers and the command line). Their public names are importable from here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile

import torch
import torch.nn.functional as F

from .cli import UsageError, errors_handled
from .config import BACKENDS, PRESETS, get_preset
from .cost_account import (
    CUSTOM_OP_CALL_S, GPU, GPUS, GRAPH_REPLAY_S, LAUNCH_OVERHEAD_S, CostAccount, Kernel, OpCost, StepAccount,
    format_step_table, format_table, host_time_per_step, merge,
)
from .cost_kernels import (
    GPU_TARGET_MULTIPROCESSORS, CostRecorder, aten_flops, custom_op_kernels, launch_flops, tensor_bytes,
)
from .paths import check_output_file
from .recipes import RECIPES

__all__ = [
    "CUSTOM_OP_CALL_S", "GPU", "GPUS", "GRAPH_REPLAY_S", "GPU_TARGET_MULTIPROCESSORS", "LAUNCH_OVERHEAD_S", "CostAccount", "CostRecorder",
    "Kernel", "OpCost", "StepAccount", "account_step_as_trained", "account_training_step", "aten_flops",
    "build_parser", "custom_op_kernels", "format_step_table", "format_table", "launch_flops", "main", "merge",
    "tensor_bytes", "training_args",
]


@contextlib.contextmanager
def _foreach_on_fake_tensors():
    """Let torch's foreach paths take fake tensors as they take real ones: ``clip_grad_norm_``
    (foreach=None) checks ``type(t)`` against a list of plain tensor types, so on fake tensors it
    would fall back to one norm and one multiply per parameter, a path no real device runs."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _foreach_utils

    types = [*_foreach_utils._foreach_supported_types, FakeTensor]
    with mock.patch.object(_foreach_utils, "_foreach_supported_types", types):
        yield


def _fake_parameters(model: torch.nn.Module, fake_mode) -> None:
    for module in model.modules():  # real (small) weights -> fake tensors of the same shapes
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(fake_mode.from_tensor(param.detach()),
                                                              requires_grad=param.requires_grad)


# ----------------------------------------------------------------------------- the pure step


def account_training_step(preset: str, batch_size: int, backend: str, **overrides) -> CostAccount:
    """Operators and bytes of a pure step (--pure): forward, backward, AdamW of ``preset``.

    fp32 parameters and activations, no autocast, no data phase, no clipping; AdamW in its
    multi-tensor (foreach) form; a steady-state step (the optimizer state already exists). The
    model is in training mode with dropout and stochastic depth off, so every backend runs the
    same math.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .model import ViTClassifier

    cfg = get_preset(preset, **overrides)
    account = CostAccount()
    model = ViTClassifier(cfg.replace(dropout=0.0, attn_dropout=0.0, drop_path=0.0), backend=backend)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_parameters(model, fake_mode)
    with fake_mode:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, foreach=True)
        images = torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
        labels = torch.randint(cfg.num_classes, (batch_size,))
        model.train()

        def step():
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # the first step allocates the optimizer state; account for a steady-state step
        with CostRecorder(account):
            step()
    return account


# ----------------------------------------------------------------------------- the step as trained


def training_args(preset: str, batch_size: int, backend: str, extra: list[str] | tuple[str, ...] = ()):
    """The training CLI's resolved configuration (vit_fast.train.TrainConfig) for ``preset`` at
    ``batch_size`` on a synthetic dataset of the
    preset's image size and class count: every recipe option at its CLI default unless ``extra``
    sets it (e.g. ``["--mixup", "0.8"]``)."""
    from . import train

    cfg = get_preset(preset)
    argv = ["--preset", preset, "--batch-size", str(batch_size), "--backend", backend, "--dataset", "synthetic",
            "--synthetic-classes", str(cfg.num_classes), "--synthetic-size", str(2 * batch_size),
            "--image-size", str(cfg.image_size), "--device", "cpu", "--no-download", *extra]
    return train.parse_args(argv)  # the recipe resolved, as the CLI resolves it


def account_step_as_trained(preset: str = "vit-cifar", batch_size: int = 128, backend: str = "torch",
                            extra: list[str] | tuple[str, ...] = ()) -> StepAccount:
    """The account of one steady-state training step as the CLI runs it (see the module docstring).

    ``setup`` builds the run on the CPU; its parameters, optimizer (``make_optimizer``), schedule
    (``make_schedule``), non-finite watch and loader tensors are then made fake, rebuilt by
    vit_fast.run's own builders where they hold parameters. bf16 autocast is on (the CLI's default on
    CUDA). One step runs un-recorded (the optimizer state is allocated there), the next is recorded.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import distributed as dist_mod
    from . import optim
    from . import run as run_mod
    from . import step as step_mod
    from .syncs import count_host_syncs

    with tempfile.TemporaryDirectory() as out_dir:
        config = training_args(preset, batch_size, backend, [*extra, "--out-dir", out_dir])
        with contextlib.redirect_stdout(io.StringIO()):  # setup's start line
            run = run_mod.setup(config, dist_mod.World(), torch.device("cpu"))
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_parameters(run.model, fake_mode)
    loader = run.train_loader
    data = loader.data
    data.images, data.labels = fake_mode.from_tensor(data.images), fake_mode.from_tensor(data.labels)
    for name in ("_mean", "_std", "_classes", "position"):
        setattr(loader, name, fake_mode.from_tensor(getattr(loader, name)))
    loader._tables = tuple(fake_mode.from_tensor(t) for t in loader._tables)
    # What a GPU runs (vit_fast.loader.DeviceLoader.uses_draw_kernel): the draw kernel on the torch and
    # fused backends, its torch twin on the reference backend.
    loader.fused_draws = backend != "reference"
    run.amp = True
    phases: dict[str, CostAccount] = {p: CostAccount() for p in step_mod.PHASES}
    with fake_mode, _foreach_on_fake_tensors():
        groups = optim.param_groups(run.model, config.weight_decay)
        run.optimizer = optim.make_optimizer(groups, config.lr, (config.beta1, config.beta2), run.device)
        run.scheduler = run_mod.make_schedule(config, run.optimizer, len(run.train_loader))
        run.watch = optim.NonFiniteWatch(run.device)
        run.model.train()
        batches = step_mod.epoch_batches(run, 0)
        step_mod.train_step(run, *step_mod.next_batch(batches))  # allocates the optimizer state
        recorder = CostRecorder(CostAccount(), phases)
        with count_host_syncs() as counter, recorder:
            def phase(name):
                stack = contextlib.ExitStack()
                stack.enter_context(counter.phase(name))
                stack.enter_context(recorder.phase(name))
                return stack

            x, y = step_mod.next_batch(batches, phase)
            step_mod.train_step(run, x, y, phase)
    syncs = {p: counter.counts[p].total if p in counter.counts else 0 for p in step_mod.PHASES}
    outside = counter.total() - sum(syncs.values())
    if outside or recorder.account.launches:
        raise RuntimeError(f"the step ran work outside its phases ({recorder.account.launches} kernels, "
                           f"{outside} host syncs); vit_fast.step.PHASES should cover all of it")
    return StepAccount(backend, phases, syncs)


def format_host_time(host: dict, estimate: dict | None) -> str:
    """The modelled host time per step beside the estimated GPU time of the graphed step."""
    lines = ["\nhost time per step (modelled: LAUNCH_OVERHEAD_S, CUSTOM_OP_CALL_S, GRAPH_REPLAY_S) beside the GPU "
             "time of the graphed step (estimate, H100 SXM)",
             f"  {'backend':10s} {'eager host ms':>14s} {'graphed host ms':>16s} {'graphed GPU ms':>15s}"]
    for backend, h in host.items():
        gpu = estimate[backend]["H100 SXM"]["total_ms"] if estimate else float("nan")
        lines.append(f"  {backend:10s} {h['eager_s'] * 1e3:14.3f} {h['graphed_s'] * 1e3:16.3f} {gpu:15.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vit_fast.cost",
                                description="Per-step cost account (kernels, casts, bytes, FLOPs, host syncs) "
                                            "of a training step, with a roofline model per GPU")
    p.add_argument("--preset", default="vit-cifar", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="the training recipe (default: the training CLI's default)")
    p.add_argument("--mixup", type=float, default=None, help="override the recipe's mixup Beta(alpha, alpha)")
    p.add_argument("--cutmix", type=float, default=None, help="override the recipe's cutmix Beta(alpha, alpha)")
    p.add_argument("--pure", action="store_true",
                   help="the fp32 forward + backward + AdamW step only (no data, autocast or clipping)")
    p.add_argument("--top", type=int, default=12, help="operators listed per backend")
    p.add_argument("--json", help="write the account here")
    p.add_argument("--no-estimate", action="store_true",
                   help="skip the GPU-time estimate from SASS (vit_fast.gpu_time; its first run compiles the "
                        "step's Triton launches for sm_90 and sm_80, a few minutes, then reads them from the cache)")
    p.add_argument("--estimate-top", type=int, default=15, help="kernels listed per backend and GPU in the estimate")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with errors_handled():  # a UsageError exits 2 (--mixup and --cutmix are checked by the training CLI's rules)
        return _main(args)


def _main(args: argparse.Namespace) -> dict:
    if args.batch_size <= 0 or args.top < 0 or args.estimate_top < 0:
        raise UsageError(f"--batch-size must be positive and --top, --estimate-top >= 0, got {args.batch_size}, "
                         f"{args.top} and {args.estimate_top}")
    if args.json:  # before the accounts, which take a while
        check_output_file(args.json, "--json")
    if args.pure:
        accounts = {b: account_training_step(args.preset, args.batch_size, b) for b in args.backends}
        print(f"cost account of a pure training step: {args.preset}, batch {args.batch_size}, fp32, AdamW (foreach)")
        print("(a model of memory traffic and launches, not a timing)\n")
        print(format_table(accounts, args.top))
        result = {"preset": args.preset, "batch_size": args.batch_size, "step": "pure", "dtype": "float32",
                  "backends": {b: a.to_dict() for b, a in accounts.items()}}
    else:
        extra = [f"--{name}={value}" for name, value in (("recipe", args.recipe), ("mixup", args.mixup),
                                                          ("cutmix", args.cutmix)) if value is not None]
        trained = training_args(args.preset, args.batch_size, "torch", extra)  # what the step runs
        args.recipe, args.mixup, args.cutmix = trained.recipe, trained.mixup, trained.cutmix
        steps = {b: account_step_as_trained(args.preset, args.batch_size, b, extra) for b in args.backends}
        print(f"cost account of the training step as trained: {args.preset}, batch {args.batch_size}, "
              f"bf16 autocast, recipe {args.recipe} (mixup {args.mixup}, cutmix {args.cutmix}, "
              f"clip {trained.clip_grad}, drop-path {trained.drop_path})")
        print("(a model of memory traffic, launches and host syncs, not a timing; CPU autocast stands in "
              "for CUDA's: see `python -c 'import vit_fast.cost; help(vit_fast.cost)'`)\n")
        print(format_step_table(steps))
        print(format_table({b: s.total for b, s in steps.items()}, args.top))
        result = {"preset": args.preset, "batch_size": args.batch_size, "step": "as_trained",
                  "recipe": args.recipe, "mixup": args.mixup, "cutmix": args.cutmix, "launch_overhead_s": LAUNCH_OVERHEAD_S,
                  "custom_op_call_s": CUSTOM_OP_CALL_S,
                  "gpus": {k: vars(g) for k, g in GPUS.items()},
                  "backends": {b: s.to_dict() for b, s in steps.items()}}
        if not args.no_estimate:
            from . import gpu_time

            estimates = {b: {g: gpu_time.estimate_step(s, g) for g in gpu_time.GPUS} for b, s in steps.items()}
            print(gpu_time.format_estimates(estimates, args.estimate_top))
            result["estimate"] = {b: {e.gpu: e.to_dict() for e in by_gpu.values()} for b, by_gpu in estimates.items()}
            result["estimate_gpus"] = {k: vars(g) for k, g in gpu_time.GPUS.items()}
        host = {b: host_time_per_step(s.total.launches, s.total.custom_op_calls) for b, s in steps.items()}
        result["host_per_step"] = host
        print(format_host_time(host, result.get("estimate")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
