"""Recipes (vit_fast.recipes) through the training command and the loader; EMA; the data preview."""

import dataclasses

import pytest
import torch
from PIL import Image

from vit_fast import data, datasets, recipes
from vit_fast.augment import erasing, mixing
from vit_fast.augment.config import AugmentConfig
from vit_fast import train as train_mod
from vit_fast.checkpoint import load_checkpoint, load_model
from vit_fast.ema import EMA
from vit_fast.loader import DeviceLoader
from vit_fast.syncs import count_host_syncs

# A tiny ViT on the synthetic task under the full default recipe: a few seconds per epoch.
TINY = ["--dataset", "synthetic", "--synthetic-size", "64", "--image-size", "16", "--synthetic-classes", "4",
        "--dim", "16", "--heads", "2", "--depth", "1", "--batch-size", "32", "--warmup-epochs", "1", "--epochs", "2",
        "--device", "cpu", "--seed", "2"]


def test_default_arguments_resolve_to_lee2021():
    args = train_mod.parse_args([])
    assert args.recipe == "lee2021"
    assert {f: getattr(args, f) for f in recipes.FIELDS} == {f: getattr(recipes.Lee2021(), f) for f in recipes.FIELDS}
    # The published values the README cites.
    r = recipes.Lee2021()
    assert (r.policy, r.erase, r.mixup, r.cutmix, r.mix_prob, r.mix_switch_prob, r.repeats) == (
        "autoaugment", 0.25, 1.0, 1.0, 0.5, 0.5, 3)
    assert (r.label_smoothing, r.drop_path, r.lr, r.batch_size, r.weight_decay, r.warmup_epochs, r.epochs) == (
        0.1, 0.1, 1e-3, 128, 0.05, 10.0, 100)


def test_flags_override_the_preset_and_the_rest_comes_from_it():
    args = train_mod.parse_args(["--recipe", "basic", "--mixup", "0.3", "--no-flip", "--epochs", "5", "--erase", "0"])
    basic = recipes.Basic()
    assert (args.mixup, args.flip, args.epochs, args.erase) == (0.3, False, 5, 0.0)
    assert (args.policy, args.repeats, args.cutmix, args.lr) == (basic.policy, 1, 0.0, basic.lr)
    fast = train_mod.parse_args(["--recipe", "fast", "--lr", "4e-3"])
    assert (fast.epochs, fast.batch_size, fast.lr, fast.drop_path) == (20, 256, 4e-3, 0.0)
    # Resolved once, into a frozen config: its recipe is the preset with the flags applied.
    assert args.recipe_values == recipes.get_recipe("basic", mixup=0.3, flip=False, epochs=5, erase=0.0)
    config = args.recipe_values.augmentation()
    assert (config.policy, config.erase, config.mixup, config.flip, config.repeats) == ("none", 0.0, 0.3, False, 1)
    assert not hasattr(config, "label_smoothing")  # the loss's, not the loader's
    with pytest.raises(SystemExit, match=r"--erase must be in \[0, 1\], got 1.5"):
        train_mod.parse_args(["--erase", "1.5"])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        train_mod.parse_args(["--recipe", "deit"])
    with pytest.raises(ValueError, match=r"unknown recipe fields \['warmup'\]"):
        recipes.get_recipe("lee2021", warmup=3)
    assert "[lee2021 0.25, basic 0, fast 0, lee2021-64 0.25]" in " ".join(train_mod.build_parser().format_help().split())


def test_the_recipe_hands_out_its_augmentation_as_the_loaders_config():
    """One augmentation config under the recipe's names (the command line's flags): each recipe's
    values, and its defaults the basic recipe's augmentation."""
    fields = [f.name for f in dataclasses.fields(AugmentConfig)]
    assert fields == [f for f in recipes.FIELDS if f in fields]  # the recipe's names, in its order
    for cls in recipes.RECIPES.values():
        recipe = cls()
        assert dataclasses.asdict(recipe.augmentation()) == {f: getattr(recipe, f) for f in fields}
    assert recipes.Basic().augmentation() == AugmentConfig()


def test_ema_update_by_hand_and_sync_free():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.75)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(1.0)
        model[1].num_batches_tracked.add_(5)
    with count_host_syncs() as counter:
        ema.update()
    counter.assert_sync_free()
    for name, live in model.state_dict().items():
        if live.is_floating_point():
            torch.testing.assert_close(ema.state_dict()[name], 0.75 * before[name] + 0.25 * live)
        else:  # integer buffers are copied, not averaged
            assert torch.equal(ema.state_dict()[name], live)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="EMA decay must lie in"):
        EMA(model, 1.0)


def test_checkpoint_records_the_recipe_ema_and_best_and_resume_is_exact(tmp_path):
    extra = ["--ema", "0.5", "--keep-best", "--erase", "0.5"]
    train_mod.train(train_mod.parse_args([*TINY, *extra, "--out-dir", str(tmp_path / "whole")]))
    split = ["--out-dir", str(tmp_path / "split")]
    train_mod.train(train_mod.parse_args([*TINY, *extra, *split, "--stop-after", "1"]))
    ckpt = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    expected = recipes.get_recipe("lee2021", erase=0.5, ema=0.5, epochs=2, batch_size=32, warmup_epochs=1.0)
    assert ckpt["recipe"] == expected.to_dict()
    assert {"ema_top1", "ema_top5", "ema_val_loss", "top1"} <= ckpt["metrics"].keys()
    assert ckpt["ema"].keys() == ckpt["model"].keys()

    with pytest.raises(SystemExit, match=r"different recipe.*'erase': \(0.5, 0.25\)"):
        train_mod.train(train_mod.parse_args([*TINY, "--ema", "0.5", "--keep-best", *split, "--resume"]))
    with pytest.raises(SystemExit, match=r"different recipe.*'policy': \('autoaugment', 'none'\)"):
        train_mod.train(train_mod.parse_args([*TINY, *extra, "--recipe", "basic", *split, "--resume"]))
    train_mod.train(train_mod.parse_args([*TINY, *extra, *split, "--resume"]))

    # The EMA and the best-epoch bookkeeping survive the interruption: bit-identical on a CPU.
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("whole", "split"))
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["best"] == b["best"] and a["best"]["epoch"] in (1, 2)
    best = load_checkpoint(tmp_path / "split" / "best.pt")
    assert best["weights"] == a["best"]["weights"] and best["epoch"] == a["best"]["epoch"]
    top1 = best["metrics"]["top1" if best["weights"] == "raw" else "ema_top1"]
    assert top1 == a["best"]["top1"] == max(max(m["top1"], m["ema_top1"]) for m in (best["metrics"], a["metrics"]))
    model, _ = load_model(tmp_path / "split" / "best.pt")
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 4)


def _small(n: int = 48, size: int = 16) -> datasets.ImageDataset:
    return datasets.synthetic(n, 4, size, seed=0)


def test_loader_batches_repeat_per_seed_and_epoch_under_the_full_recipe():
    ds = _small()
    mean, std = datasets.channel_stats(ds.images)
    config = recipes.get_recipe("lee2021", mix_prob=1.0).augmentation()
    assert config.repeats == 3

    def batches(epoch, seed=1):
        loader = DeviceLoader(ds, 16, mean, std, True, config, seed=seed)
        loader.set_epoch(epoch)
        return list(loader)

    first = batches(0)
    assert len(first) == 3 and first[0][1].shape == (16, 4)  # mixed one-hot targets, unsmoothed
    torch.testing.assert_close(first[0][1].sum(1), torch.ones(16))
    for (x, y), (x2, y2) in zip(first, batches(0)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(first[0][0], batches(1)[0][0])
    assert not torch.equal(first[0][0], batches(0, seed=2)[0][0])


def test_repeated_augmentation_copies_differ_and_ranks_match_one_process():
    """Rank r's batch, policy and erasing included, is rows r, r + W, ... of the single-process
    batch; the three copies of an image sit side by side there and go to three ranks."""
    ds = _small()
    mean, std = datasets.channel_stats(ds.images)
    config = recipes.get_recipe("lee2021", mixup=0.0, cutmix=0.0, erase=0.5, crop_padding=0).augmentation()
    assert config.repeats == 3
    whole_loader = DeviceLoader(ds, 12, mean, std, True, config, seed=4)
    whole = list(whole_loader)
    ranks = [list(DeviceLoader(ds, 4, mean, std, True, config, seed=4, rank=r, world_size=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4] and len(whole) == 4
    for b in range(4):
        for r in range(3):
            assert torch.equal(ranks[r][b][0], whole[b][0][r::3]) and torch.equal(ranks[r][b][1], whole[b][1][r::3])
    # The epoch's order holds each image three times in a row, so the copies of an image sit side by
    # side in a global batch and rank r takes the r-th copy of each.
    order = whole_loader._indices(torch.Generator().manual_seed(0))
    assert order.shape == (48,) and torch.equal(order.view(16, 3), order[::3].view(16, 1).expand(16, 3))
    x = torch.cat([b[0] for b in whole])
    copies = x.view(16, 3, *x.shape[1:])
    differ = [not torch.equal(c[0], c[1]) or not torch.equal(c[1], c[2]) for c in copies]
    assert sum(differ) >= 14  # augmented independently (a copy may draw the same ops as another)


def test_a_training_batch_makes_no_host_sync():
    ds = _small()
    mean, std = datasets.channel_stats(ds.images)
    loader = DeviceLoader(ds, 16, mean, std, True, recipes.Lee2021().augmentation())
    batches = iter(loader)
    next(batches)  # the epoch's order is drawn at the first batch, the policy's tables built once
    with count_host_syncs() as counter:
        next(batches)
    counter.assert_sync_free()


def test_preview_writes_a_png_grid(tmp_path, capsys):
    out = data.main(["--preview", str(tmp_path / "grid.png"), "--dataset", "synthetic", "--count", "8",
                     "--epoch", "1", "--mix-prob", "1"])
    assert out == tmp_path / "grid.png"
    assert "8 training images of synthetic under recipe lee2021" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 100
    with pytest.raises(SystemExit, match="--count must be positive"):
        data.main(["--preview", str(tmp_path / "x.png"), "--dataset", "synthetic", "--count", "0"])


def test_recipes_are_frozen_dataclasses_with_every_field_checked():
    for name, cls in recipes.RECIPES.items():
        recipe = cls()
        assert recipe.name == name and dataclasses.is_dataclass(recipe)
        recipes.check(recipe)
        with pytest.raises(dataclasses.FrozenInstanceError):
            recipe.lr = 1.0  # type: ignore[misc]


def test_mix_prob_and_erase_area_the_lee2021_recipe_sets():
    x, y = torch.randn(8, 3, 16, 16), torch.eye(4).repeat(2, 1)  # (8, 4) one-hot targets

    def mixed(**kw):
        return mixing.mix(x, y, 1.0, 1.0, generator=torch.Generator().manual_seed(3), **kw)

    xa, ya = mixed()
    xb, yb = mixed(prob=1.0)  # prob 1 draws nothing more: the stream and the result are unchanged
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, x)
    for mode in ("batch", "elem"):
        x0, y0 = mixed(prob=0.0, mode=mode)
        assert torch.equal(x0, x) and torch.equal(y0, y)
    # Per image ("elem") with prob 0.5: some images mixed, the others exactly as they were.
    xe, ye = mixing.mix(x, y, 1.0, 0.0, mode="elem", generator=torch.Generator().manual_seed(0), prob=0.5)
    kept = [torch.equal(xe[i], x[i]) and torch.equal(ye[i], y[i]) for i in range(8)]
    assert 0 < sum(kept) < 8

    g = torch.Generator().manual_seed(1)
    masks = erasing.erase_boxes(512, 20, 20, 1.0, g, "cpu", scale=(0.02, 0.4))
    area = masks.float().mean(dim=(1, 2, 3))
    assert area.max() <= 0.4 + 0.06 and area.max() > 1 / 3  # up to 40% (rounded to pixels), not 1/3
