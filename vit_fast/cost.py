"""A per-step cost account: operators launched and bytes moved by one training step.

For one full training step (forward, backward, AdamW step) of a preset at a batch size, every
operator that reaches PyTorch's dispatcher is recorded with the bytes of each tensor it reads and
writes. Views and metadata-only operators (those whose outputs alias their inputs, allocations)
are excluded; each of our custom ops (namespace ``vit_fast``) counts as one launch, whatever it
does inside.

This is a *model* of memory traffic and launch overhead, the two costs that fusion exists to
cut, not a measurement of time: it assumes every operator reads its inputs and writes its
outputs once from memory (no cache reuse between operators) and ignores what a kernel re-reads
internally. It runs on fake tensors (no data, no compute), so any preset and batch size is
accounted for in seconds on a CPU, including the fused backend, whose ops contribute through
their registered fake implementations and autograd formulas. Those check only shapes, dtypes and
devices, never whether Triton could run a kernel here, so fake CPU tensors need no interpreter
(``vit_fast.fused.launch`` says which checks run where).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import BACKENDS, get_preset

# Allocation-only or bookkeeping operators: no kernel reads or writes memory for them.
_FREE_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
             "_local_scalar_dense", "copy_", "_unsafe_view", "is_same_size", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset", "_has_compatible_shallow_copy_type", "set_"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (an expanded, stride-0 dim counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _is_view(func) -> bool:
    """True for operators whose outputs alias an input without writing it (view, transpose, ...)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


@dataclass
class OpCost:
    launches: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


@dataclass
class CostAccount:
    ops: dict[str, OpCost] = field(default_factory=lambda: defaultdict(OpCost))

    @property
    def launches(self) -> int:
        return sum(c.launches for c in self.ops.values())

    @property
    def bytes(self) -> int:
        return sum(c.bytes_read + c.bytes_written for c in self.ops.values())

    def to_dict(self) -> dict:
        return {"launches": self.launches, "bytes": self.bytes,
                "ops": {k: vars(v) for k, v in sorted(self.ops.items(), key=lambda kv: -(kv[1].bytes_read + kv[1].bytes_written))}}


class OpRecorder(TorchDispatchMode):
    """Records every dispatched operator into a CostAccount: `with OpRecorder(acc): ...`."""

    def __init__(self, account: CostAccount) -> None:
        super().__init__()
        self.account = account

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        ns = func.namespace
        if ns in ("prim", "profiler"):  # metadata queries, profiler markers
            return out
        if ns == "aten" and (name in _FREE_OPS or _is_view(func)) and not (name == "copy_" and args[0].shape):
            return out
        if ns == "aten" and name == "copy_":  # a real copy into a buffer: read source, write destination
            read, written = tensor_bytes(args[1]), tensor_bytes(args[0])
        else:
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            read = sum(tensor_bytes(t) for t in ins)
            mutated = [a for a, arg in zip(args, func._schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write]
            mutated_ids = {id(t) for t in tree_flatten(mutated)[0] if isinstance(t, torch.Tensor)}
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and id(t) not in mutated_ids]
            written = sum(tensor_bytes(t) for t in tree_flatten(mutated)[0] if isinstance(t, torch.Tensor))
            written += sum(tensor_bytes(t) for t in outs)
        cost = self.account.ops[f"{ns}::{name}"]
        cost.launches += 1
        cost.bytes_read += read
        cost.bytes_written += written
        return out


def account_training_step(preset: str, batch_size: int, backend: str, **overrides) -> CostAccount:
    """Operators and bytes of one training step (forward, backward, AdamW) of ``preset``.

    fp32 parameters and activations, no autocast; AdamW in its multi-tensor (foreach) form, the
    default on CUDA; a steady-state step (the optimizer state already exists). The model is in training mode with dropout and stochastic depth off, so every
    backend runs the same math.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .model import ViTClassifier

    cfg = get_preset(preset, **overrides)
    account = CostAccount()
    model = ViTClassifier(cfg.replace(dropout=0.0, attn_dropout=0.0, drop_path=0.0), backend=backend)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    for module in model.modules():  # real (small) weights -> fake tensors of the same shapes
        for name, param in module._parameters.items():
            module._parameters[name] = torch.nn.Parameter(fake_mode.from_tensor(param.detach()))
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
        with OpRecorder(account):
            step()
    return account


def format_table(accounts: dict[str, CostAccount], top: int = 12) -> str:
    lines = []
    base = accounts.get("reference")
    lines.append(f"{'backend':<10} {'launches':>9} {'GB moved':>9} {'vs reference':>22}")
    for name, acc in accounts.items():
        rel = f"{acc.launches / base.launches:.2f}x ops, {acc.bytes / base.bytes:.2f}x bytes" if base else ""
        lines.append(f"{name:<10} {acc.launches:>9d} {acc.bytes / 1e9:>9.3f} {rel:>22}")
    for name, acc in accounts.items():
        lines.append(f"\n{name}: top operators by bytes")
        lines.append(f"  {'operator':<44} {'launches':>8} {'MB read':>10} {'MB written':>11}")
        for op, c in list(acc.to_dict()["ops"].items())[:top]:
            lines.append(f"  {op:<44} {c['launches']:>8d} {c['bytes_read'] / 1e6:>10.1f} {c['bytes_written'] / 1e6:>11.1f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Per-step cost account (operators, bytes) of a training step")
    p.add_argument("--preset", default="vit-cifar")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--json", help="write the account here")
    args = p.parse_args(argv)
    accounts = {b: account_training_step(args.preset, args.batch_size, b) for b in args.backends}
    print(f"cost account of one training step: {args.preset}, batch {args.batch_size}, fp32, AdamW (foreach)")
    print("(a model of memory traffic and launches, not a timing)\n")
    print(format_table(accounts))
    result = {"preset": args.preset, "batch_size": args.batch_size, "dtype": "float32",
              "backends": {b: a.to_dict() for b, a in accounts.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
