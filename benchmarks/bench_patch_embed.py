"""Benchmark of the fused patch embedding (vit_fast._C) against PyTorch and the reference.

Providers, side by side in one process:
  fused          vit_fast.fused.patch_embed (one CUDA kernel forward; see csrc/patch_embed_cuda.cu)
  torch          conv2d -> flatten -> transpose -> cat(class token) -> + pos_embed (what users write)
  torch.compile  the same torch code under torch.compile
  reference      vit_fast.reference.patch_embed (reshape patchify + matmul)
Passes: forward, and forward + backward of the parameters (the training step: images do not
require grad).

Byte model (the minimum traffic of one pass, the same for every provider, so GB/s compares
providers and reads against the device's peak):
  forward   read images B*C*H*W + weight D*K + bias, cls, pos (N+1)*D + 2D; write tokens B*(N+1)*D
  backward  read grad_out B*(N+1)*D + images B*C*H*W; write grad weight D*K + grad pos, cls, bias
times the element size. K = C*p*p, N = (H/p)*(W/p).

Without a GPU nothing is timed; the script checks the fused op against the reference on the CPU
(forward and every gradient, both configurations at small batch) and reports the byte model.

    python benchmarks/bench_patch_embed.py [--quick] [--out-dir DIR] [--dtype bf16|fp16|fp32]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vit_fast import reference  # noqa: E402
from vit_fast.fused import patch_embed as fused  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class EmbedConfig:
    name: str
    channels: int
    image_size: int
    patch: int
    dim: int
    batches: tuple[int, ...]  # the sweep
    quick_batches: tuple[int, ...]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def inner(self) -> int:
        return self.channels * self.patch * self.patch


CONFIGS = [
    # The project's model: vit-tiny on CIFAR (K = 48, the direct kernel's home ground).
    EmbedConfig("cifar_p4_d192", 3, 32, 4, 192, (64, 128, 256, 512, 1024), (256,)),
    # ViT-B/16 on ImageNet-size images (K = 768): where a tensor-core GEMM may win.
    EmbedConfig("imagenet_p16_d768", 3, 224, 16, 768, (8, 16, 32, 64, 128), (64,)),
]


def torch_patch_embed(images, weight, bias, cls_token, pos_embed):
    """What a PyTorch user writes (timm's PatchEmbed + cat + add): four passes over the tokens."""
    p = weight.shape[-1]
    tokens = F.conv2d(images, weight, bias, stride=p).flatten(2).transpose(1, 2)  # (B, N, D)
    return torch.cat([cls_token.expand(images.shape[0], -1, -1), tokens], dim=1) + pos_embed


def make_inputs(cfg: EmbedConfig, batch: int, dtype, device):
    kw = dict(dtype=dtype, device=device)
    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, **kw)
    params = [
        torch.randn(cfg.dim, cfg.channels, cfg.patch, cfg.patch, **kw) * cfg.inner**-0.5,
        torch.randn(cfg.dim, **kw),
        torch.randn(1, 1, cfg.dim, **kw),
        torch.randn(1, cfg.num_patches + 1, cfg.dim, **kw),
    ]
    return images, [p.requires_grad_() for p in params]


def bytes_moved(cfg: EmbedConfig, batch: int, element_size: int) -> dict[str, int]:
    images = batch * cfg.channels * cfg.image_size**2
    tokens = batch * (cfg.num_patches + 1) * cfg.dim
    params = cfg.dim * cfg.inner + (cfg.num_patches + 1) * cfg.dim + 2 * cfg.dim
    forward = images + params + tokens
    backward = tokens + images + params
    return {"forward": forward * element_size, "forward_backward": (forward + backward) * element_size}


def providers():
    return {
        "fused": fused.patch_embed,
        "torch": torch_patch_embed,
        "torch.compile": torch.compile(torch_patch_embed),
        "reference": reference.patch_embed,
    }


def run_gpu(args) -> dict:
    dtype = DTYPES[args.dtype]
    peaks = common.device_peaks()
    results = []
    fns = providers()  # once: torch.compile caches its graphs per shape
    for cfg in CONFIGS:
        for batch in cfg.quick_batches if args.quick else cfg.batches:
            images, params = make_inputs(cfg, batch, dtype, "cuda")
            grad_out = torch.randn(batch, cfg.num_patches + 1, cfg.dim, dtype=dtype, device="cuda")
            model = bytes_moved(cfg, batch, images.element_size())
            row = {"config": cfg.name, "batch": batch, "bytes": model, "providers": {}}
            for name, fn in fns.items():
                with torch.no_grad():
                    fwd = common.time_cuda(lambda: fn(images, *params))
                fwd_bwd = common.time_cuda(lambda: torch.autograd.grad(fn(images, *params), params, grad_out))
                entry = {}
                for pass_name, t in (("forward", fwd), ("forward_backward", fwd_bwd)):
                    gbps = model[pass_name] / (t["ms"] * 1e-3) / 1e9
                    entry[pass_name] = {**t, "gbps": gbps,
                                        "pct_peak_bw": 100 * gbps / peaks["peak_gbps"] if peaks["peak_gbps"] else None}
                row["providers"][name] = entry
            for pass_name in ("forward", "forward_backward"):
                fused_ms = row["providers"]["fused"][pass_name]["ms"]
                row[f"speedup_{pass_name}"] = {
                    name: e[pass_name]["ms"] / fused_ms for name, e in row["providers"].items() if name != "fused"
                }
            results.append(row)
            p = row["providers"]
            print(
                f"{cfg.name:>18} B={batch:<5} fwd: fused {p['fused']['forward']['ms']:.3f} ms "
                f"({p['fused']['forward']['gbps']:.0f} GB/s), x{row['speedup_forward']['torch']:.2f} vs torch, "
                f"x{row['speedup_forward']['reference']:.2f} vs reference | fwd+bwd: "
                f"fused {p['fused']['forward_backward']['ms']:.3f} ms, x{row['speedup_forward_backward']['torch']:.2f} vs torch"
            )
    for cfg in CONFIGS:
        rows = [r for r in results if r["config"] == cfg.name]
        if len(rows) < 2:
            continue
        batches = [r["batch"] for r in rows]
        for pass_name in ("forward", "forward_backward"):
            series = {name: [r["providers"][name][pass_name]["gbps"] for r in rows] for name in rows[0]["providers"]}
            common.plot_lines(
                Path(args.out_dir or common.RESULTS_DIR) / f"bench_patch_embed_{cfg.name}_{pass_name}.png",
                batches, series, "batch", "GB/s (byte model)",
                f"patch embedding {pass_name}, {cfg.name}, {args.dtype}", logx=True,
            )
    return {"device": peaks, "dtype": args.dtype, "results": results}


def run_cpu_smoke(args) -> dict:
    """Fused vs reference on the CPU, forward and every gradient, in fp32 (fp64 reference)."""
    notice = common.no_gpu_notice("bench_patch_embed")
    checks = []
    for cfg in CONFIGS:
        images, params = make_inputs(cfg, 2, torch.float32, "cpu")
        images.requires_grad_()
        inputs = [images, *params]
        grad_out = torch.randn(2, cfg.num_patches + 1, cfg.dim)
        out = fused.patch_embed(*inputs)
        grads = torch.autograd.grad(out, inputs, grad_out)
        ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
        ref = reference.patch_embed(*ref_inputs)
        ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
        errors = {
            name: (a.double() - b).abs().max().item()
            for name, a, b in zip(["tokens", "images", "weight", "bias", "cls_token", "pos_embed"],
                                  [out, *grads], [ref, *ref_grads])
        }
        ok = all(err <= 1e-3 * max(1.0, b.abs().max().item())
                 for err, b in zip(errors.values(), [ref, *ref_grads]))
        checks.append({"config": asdict(cfg), "max_abs_error_vs_fp64": errors, "ok": ok,
                       "bytes_bf16_batch256": bytes_moved(cfg, 256, 2)})
        print(f"{cfg.name}: {'OK' if ok else 'MISMATCH'}  max |fused - reference| = "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    if not all(c["ok"] for c in checks):
        raise SystemExit("bench_patch_embed: the fused op disagrees with the reference")
    return {"notice": notice, "smoke": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one batch size per configuration")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"where JSON and PNGs go (default {common.RESULTS_DIR})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    if not fused.extension_available():
        raise SystemExit(f"bench_patch_embed: {fused._LOAD_ERROR}; rebuild with: {fused.REBUILD_COMMAND}")
    payload = run_gpu(args) if common.gpu_available() else run_cpu_smoke(args)
    common.write_json("bench_patch_embed", payload, args.out_dir)


if __name__ == "__main__":
    main()
