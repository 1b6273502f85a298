"""The reference ViT: presets, parameter names and counts, backends, initialisation, errors."""

import pytest
import torch

from vit_fast import PRESETS, ViTConfig, build_model, get_preset, reference
from vit_fast.model import ViTClassifier

SMALL = ViTConfig(dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)


def expected_parameter_count(cfg: ViTConfig) -> int:
    """Counted from the architecture, independently of the module code."""
    D, Hd, K = cfg.dim, cfg.mlp_hidden, cfg.num_classes
    patch = cfg.in_channels * cfg.patch_size**2 * D + D
    block = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * Hd + Hd) + (Hd * D + D)
    return patch + D + cfg.num_tokens * D + cfg.depth * block + 2 * D + D * K + K


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_shapes_and_parameter_counts(name):
    cfg = PRESETS[name]
    assert (cfg.image_size, cfg.patch_size, cfg.num_tokens) == (32, 4, 65)
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(cfg)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, cfg.num_classes)


def test_preset_values():
    assert (PRESETS["vit-tiny"].dim, PRESETS["vit-tiny"].depth, PRESETS["vit-tiny"].num_heads) == (192, 12, 3)
    assert (PRESETS["vit-small"].dim, PRESETS["vit-small"].depth, PRESETS["vit-small"].num_heads) == (384, 12, 6)
    c = PRESETS["vit-cifar"]
    assert (c.dim, c.depth, c.num_heads, c.mlp_hidden) == (192, 9, 12, 384)


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("cfg", [SMALL, PRESETS["vit-cifar"]], ids=["small", "vit-cifar"])
def test_reference_and_torch_backends_agree(cfg, dtype, tol):
    model = ViTClassifier(cfg).to(dtype)
    x = torch.randn(3, 3, 32, 32, dtype=dtype)
    out_ref, g_ref = _grads(model.set_backend("reference"), x)
    out_pt, g_pt = _grads(model.set_backend("torch"), x)
    torch.testing.assert_close(out_pt, out_ref, rtol=tol, atol=tol)
    assert g_ref.keys() == g_pt.keys() and len(g_ref) == len(list(model.parameters()))
    for name in g_ref:
        scale = g_ref[name].abs().max().item() + 1e-12
        err = (g_pt[name] - g_ref[name]).abs().max().item()
        assert err <= tol * max(1.0, scale), f"{name}: gradient differs by {err:.3e} (scale {scale:.3e})"


def test_backend_switch_keeps_parameters_and_state_dict():
    model = ViTClassifier(SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_backend("torch")
    assert all(m.backend == "torch" for m in model.modules() if hasattr(type(m), "backend"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    other = ViTClassifier(SMALL, backend="reference")
    other.load_state_dict(after)


def test_the_backend_lives_in_one_holder_owned_by_the_root():
    model = ViTClassifier(SMALL, backend="torch")
    readers = [m for m in model.modules() if hasattr(type(m), "backend")]
    assert {type(m).__name__ for m in readers} >= {"PatchEmbed", "LayerNorm", "Linear", "Attention", "Mlp"}
    assert all(m.backend_choice is model.backend_choice for m in readers)
    model.set_backend("reference")
    assert model.backend_choice.name == "reference" and all(m.backend == "reference" for m in readers)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        model.set_backend("cudnn")
    assert model.backend == "reference"  # a refused backend changes nothing
    from vit_fast.model import LayerNorm

    assert LayerNorm(8).backend == "reference"  # a module built outside a model computes the reference math


def test_patch_embed_forward_is_the_reference_patch_embedding():
    model = ViTClassifier(SMALL, backend="torch").to(torch.float64)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pe = model.patch_embed
    tokens = pe(images, model.cls_token, model.pos_embed)  # (B, N+1, D)
    expected = reference.patch_embed(images, pe.proj.weight, pe.proj.bias, model.cls_token, model.pos_embed)
    assert tokens.shape == (2, SMALL.num_tokens, SMALL.dim)
    torch.testing.assert_close(tokens, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["vit-cifar", "vit-tiny"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_matches_timm_vision_transformer(name, backend):
    timm = pytest.importorskip("timm", reason="timm is the independent reference (pip install timm)")
    cfg = PRESETS[name]
    ours = build_model(name, backend=backend).eval()
    theirs = timm.models.VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes, embed_dim=cfg.dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
    ).eval()
    assert set(theirs.state_dict()) == set(ours.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.abs().max() > 0.1 and a.std() > 0.05  # logits far from zero: the comparison has teeth
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_timm_style_initialisation():
    torch.manual_seed(0)
    model = build_model("vit-tiny")
    assert torch.all(model.blocks[0].norm1.weight == 1) and torch.all(model.blocks[0].norm1.bias == 0)
    w = torch.cat([b.mlp.fc1.weight.flatten() for b in model.blocks])
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 1e-3
    assert all(torch.all(b.attn.qkv.bias == 0) for b in model.blocks)
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert model.cls_token.abs().max() < 1e-4


def test_stochastic_depth_and_dropout_only_in_training():
    model = ViTClassifier(SMALL.replace(drop_path=0.5, dropout=0.1))
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_config_errors():
    with pytest.raises(ValueError, match=r"patch_size=5 does not divide image_size=32"):
        ViTConfig(patch_size=5)
    with pytest.raises(ValueError, match=r"unknown preset 'vit-huge'"):
        get_preset("vit-huge")
    with pytest.raises(ValueError, match=r"dim=64 is not a multiple of num_heads=3"):
        ViTConfig(dim=64, num_heads=3)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        ViTClassifier(SMALL, backend="cudnn")
    with pytest.raises(ValueError, match="drop_path must be in"):
        ViTConfig(drop_path=1.5)


def test_bad_images_are_rejected():
    model = ViTClassifier(SMALL)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\), got \(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match="floating-point images.*torch.uint8"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_other_image_and_patch_sizes():
    cfg = SMALL.replace(image_size=48, patch_size=8)
    model = ViTClassifier(cfg)
    assert model.pos_embed.shape == (1, 37, 64)
    out_ref = model(torch.randn(2, 3, 48, 48))
    assert out_ref.shape == (2, 10)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_reference_gelu_matches_torch(approximate):
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    torch.testing.assert_close(reference.gelu(x, approximate), torch.nn.functional.gelu(x, approximate=approximate))


def test_reference_ops_gradcheck():
    """Rung 1 of the verification ladder: the reference math has correct gradients (fp64)."""
    d = dict(dtype=torch.float64, requires_grad=True)
    x, w, b = torch.randn(3, 5, 12, **d), torch.randn(12, **d), torch.randn(12, **d)
    assert torch.autograd.gradcheck(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), (x, w, b))
    q, k, v = (torch.randn(1, 2, 5, 8, **d) for _ in range(3))
    assert torch.autograd.gradcheck(reference.attention, (q, k, v))
    img = torch.randn(2, 3, 8, 8, **d)
    wt, bt = torch.randn(6, 3, 4, 4, **d), torch.randn(6, **d)
    cls, pos = torch.randn(1, 1, 6, **d), torch.randn(1, 5, 6, **d)
    assert torch.autograd.gradcheck(reference.patch_embed, (img, wt, bt, cls, pos))


def test_reference_softmax_is_stable_for_huge_logits():
    s = torch.tensor([[1e4, 1e4 - 1.0, -1e4]])
    p = reference.softmax(s)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, torch.softmax(s, dim=-1))
