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
    assert (cfg.image_size, cfg.patch_size, cfg.num_tokens) == ((64, 8, 65) if name == "vit-64" else (32, 4, 65))
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(cfg)
    logits = model(torch.randn(2, 3, cfg.image_size, cfg.image_size))
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


# ---------------------------------------------------------------------------------------------
# Stochastic depth: one draw per step


def _dispatched(fn) -> list[str]:
    """The aten operators ``fn()`` dispatches, by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Names() as mode:
        fn()
    return mode.names


@pytest.mark.parametrize("depth", [2, 5])
def test_drop_path_is_one_draw_per_step_whatever_the_depth(depth):
    """A training forward draws every block's masks in one Bernoulli kernel and one division (it
    drew two kernels per DropPath); eval draws nothing."""
    model = ViTClassifier(SMALL.replace(depth=depth, drop_path=0.3), backend="torch").train()
    names = _dispatched(lambda: model(torch.randn(3, 3, 32, 32)))
    assert names.count("bernoulli") == 1 and "bernoulli_" not in names, names
    assert names.count("div") == 1, names
    assert "bernoulli" not in _dispatched(lambda: model.eval()(torch.randn(3, 3, 32, 32)))


def test_draw_keep_scales_law():
    """Row r is Bernoulli(keep[r]) / keep[r] rounded once to the branch dtype: values 0 or
    1/keep, with the keep frequency within 5 standard deviations of keep."""
    from vit_fast.model import draw_keep_scales

    keep = torch.tensor([[0.9], [0.5], [1.0]])
    batch = 20000
    for dtype in (torch.float32, torch.bfloat16):
        scales = draw_keep_scales(keep, batch, dtype)
        assert scales.shape == (3, batch) and scales.dtype == dtype
        for row, k in enumerate(keep.flatten().tolist()):
            values = set(scales[row].unique().tolist())
            assert values <= {0.0, torch.tensor(1.0 / k).to(dtype).item()}, (row, values)
            kept = (scales[row] != 0).double().mean().item()
            assert abs(kept - k) <= 5 * (k * (1 - k) / batch) ** 0.5 + 1e-12, (row, kept, k)


def test_each_block_takes_its_rows_of_the_draw():
    """The model's masks are rows 2i, 2i + 1 of one draw (``draw_keep_scales``), block 0's rows
    unused (its rate is 0 by the linear rule): a forward fed those rows by hand gives the model's
    output under the same seed."""
    from vit_fast.model import draw_keep_scales

    model = ViTClassifier(SMALL.replace(depth=3, drop_path=0.5), backend="torch").train()
    assert [b.drop_path1.p for b in model.blocks] == [0.0, 0.25, 0.5]
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    tokens = model.patch_embed(x, model.cls_token, model.pos_embed)
    scales = draw_keep_scales(model.drop_path_keep.view(torch.float32), 4, torch.float32)
    assert scales.shape == (6, 4) and torch.all(scales[:2] == 1) and set(scales[4:].unique().tolist()) <= {0.0, 2.0}
    assert (scales[2:] == 0).any(), "no sample dropped: the comparison would not see a misplaced row"
    for i, block in enumerate(model.blocks):
        branch = block.attn(block.norm1(tokens))
        s1 = scales[2 * i].view(4, 1, 1) if i else 1.0
        s2 = scales[2 * i + 1].view(4, 1, 1) if i else 1.0
        tokens = tokens + s1 * branch
        tokens = tokens + s2 * block.mlp(block.norm2(tokens))
    expected = model.head(model.norm(tokens)[:, 0])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_a_block_on_its_own_draws_its_own_masks():
    from vit_fast.model import ViTEncoder

    block = ViTEncoder(SMALL, drop_path=0.5).train()
    x = torch.randn(8, 5, SMALL.dim)
    torch.manual_seed(1)
    a = block(x)
    torch.manual_seed(1)
    assert torch.equal(block(x), a)  # the seed decides the masks
    assert not torch.equal(block(x), a)  # and each call draws anew
    assert torch.equal(block.eval()(x), block(x))  # no masks in eval


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_keep_probabilities_survive_a_dtype_conversion(dtype):
    """model.half() converts floating buffers; the keep probabilities are held as integer bit
    patterns, so the masks keep their law (bf16 would make 0.9 into 0.8984)."""
    model = ViTClassifier(SMALL.replace(drop_path=0.1)).to(dtype)
    keep = model.drop_path_keep.view(torch.float32).flatten()
    assert keep.tolist() == torch.tensor([1.0, 1.0, 0.9, 0.9]).tolist()
    assert "drop_path_keep" not in model.state_dict()  # not a parameter of the model: rebuilt from cfg
    assert ViTClassifier(SMALL).drop_path_keep is None  # no stochastic depth, no draw


def test_backward_sums_no_stream_gradients():
    """Every tensor of the residual stream feeds one op (each block's output is formed by the next
    LayerNorm's forward_add), so on the fused backend, whose ops are one autograd node each, the
    backward sums no two gradients of a stream tensor: of the (B, N, D) additions autograd makes,
    only the patch embedding's output (read by block 0's norm1 and by its residual step) remains.
    Chaining the blocks through ``ViTEncoder.forward`` instead adds one per block output read by a
    next block. (The torch
    and reference backends' add+LayerNorm is a composite that reads its sum twice, so autograd sums
    inside it.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    cfg = SMALL.replace(depth=3, dim=32, num_heads=2)
    stream = (2, cfg.num_tokens, cfg.dim)

    class StreamAdds(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.add and all(
                    isinstance(a, torch.Tensor) and tuple(a.shape) == stream for a in args[:2]):
                self.count += 1
            return func(*args, **(kwargs or {}))

    from torch._subclasses.fake_tensor import FakeTensorMode

    # On fake tensors the fused ops run their fake implementations: autograd's graph is the real
    # one, and no kernel runs.
    fake = FakeTensorMode()
    model = ViTClassifier(cfg, backend="fused").train()
    for module in model.modules():
        for name, param in module._parameters.items():
            module._parameters[name] = torch.nn.Parameter(fake.from_tensor(param.detach()))

    def blockwise(images):  # the same model, each block's output formed on its own
        x = model.patch_embed(images, model.cls_token, model.pos_embed)
        for block in model.blocks:
            x = block(x)
        return model.head(model.norm(x)[:, 0])

    counts = []
    for forward in (model, blockwise):
        with fake:
            loss = forward(torch.randn(2, 3, 32, 32)).square().sum()  # 2 images: the stream is (2, 65, 32)
            with StreamAdds() as adds:
                loss.backward()
        counts.append(adds.count)
    assert counts == [1, cfg.depth]
    # The chained forward computes what the blocks compute on their own.
    model = ViTClassifier(cfg, backend="torch").double().train()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(0)
    chained = model(images)
    torch.manual_seed(0)
    torch.testing.assert_close(blockwise(images), chained, rtol=1e-12, atol=1e-12)
