"""Benchmark of the fused patch embedding (vit_fast._C) against PyTorch and the reference.

Providers, side by side in one process, all vit_fast.ops.patch_embed with a backend:
  fused          backend "fused": vit_fast.fused.patch_embed (one CUDA kernel forward; see
                 csrc/patch_embed_cuda.cu)
  torch          backend "torch": conv2d -> flatten -> transpose -> cat(class token) -> + pos_embed
                 (what users write)
  torch.compile  the torch provider under torch.compile
  reference      backend "reference": reshape patchify + matmul
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

from dataclasses import asdict, dataclass

import torch

from vit_fast import benchmarking as common
from vit_fast.benchmarking import PASSES
from vit_fast import ops

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


def patch_embed(backend: str):
    return lambda images, weight, bias, cls_token, pos_embed: ops.patch_embed(
        images, weight, bias, cls_token, pos_embed, backend)


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


def run_gpu(args) -> dict:
    dtype = DTYPES[args.dtype]
    peaks = common.device_peaks()
    results = []
    for cfg in CONFIGS:
        for batch in cfg.quick_batches if args.quick else cfg.batches:
            images, params = make_inputs(cfg, batch, dtype, "cuda")
            grad_out = torch.randn(batch, cfg.num_patches + 1, cfg.dim, dtype=dtype, device="cuda")
            model = bytes_moved(cfg, batch, images.element_size())
            row = {"config": cfg.name, "batch": batch, "bytes": model, "providers": {}}
            for name, fn in common.providers(patch_embed).items():
                times = common.time_passes(fn, [images, *params], params, grad_out)
                row["providers"][name] = common.with_rates(times, model, "gbps", 1e9, peaks["peak_gbps"], "pct_peak_bw")
            common.add_speedups(row)
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
        for pass_name in PASSES:
            series = {name: [r["providers"][name][pass_name]["gbps"] for r in rows] for name in rows[0]["providers"]}
            common.plot_lines(
                args.out_dir / f"bench_patch_embed_{cfg.name}_{pass_name}.png",
                batches, series, "batch", "GB/s (byte model)",
                f"patch embedding {pass_name}, {cfg.name}, {args.dtype}", logx=True,
            )
    return {"device": peaks, "dtype": args.dtype, "results": results}


def run_cpu(args) -> dict:
    """Fused vs reference on the CPU, forward and every gradient, in fp32 (fp64 reference)."""
    notice = common.no_gpu_notice("bench_patch_embed")
    checks = []
    for cfg in CONFIGS:
        images, params = make_inputs(cfg, 2, torch.float32, "cpu")  # fp32 values: exact in the fp64 reference
        grad_out = [torch.randn(2, cfg.num_patches + 1, cfg.dim)]  # (B, N+1, D)
        got, want = (common.outputs_and_grads(patch_embed(backend), [images, *params], grad_out, dtype)
                     for backend, dtype in (("fused", torch.float32), ("reference", torch.float64)))
        errors = {name: common.max_abs_diff(a, b)
                  for name, a, b in zip(["tokens", "images", "weight", "bias", "cls_token", "pos_embed"], got, want)}
        ok = all(err <= 1e-3 * max(1.0, b.abs().max().item()) for err, b in zip(errors.values(), want))
        checks.append({"config": asdict(cfg), "max_abs_error_vs_fp64": errors, "ok": ok,
                       "bytes_bf16_batch256": bytes_moved(cfg, 256, 2)})
        print(f"{cfg.name}: {'OK' if ok else 'MISMATCH'}  max |fused - reference| = "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    failures = [f"the fused op disagrees with the reference at {c['config']['name']}" for c in checks if not c["ok"]]
    return {"notice": notice, "smoke": checks, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, "one batch size per configuration", __file__)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    return common.run("bench_patch_embed", parser.parse_args(argv), run_gpu, run_cpu)


if __name__ == "__main__":
    raise SystemExit(main())
