"""Datasets larger than the GPU: host-resident images staged per batch (DeviceLoader's
``host_images``), the same batches as the device-resident loader's, and --data-device's choice."""

import contextlib
import types

import pytest
import torch

from vit_fast import datasets, recipes
from vit_fast import run as run_mod
from vit_fast import train as train_mod
from vit_fast.augment.config import AugmentConfig
from vit_fast.checkpoint import load_checkpoint
from vit_fast.loader import DATA_SHARE_OF_FREE, DeviceLoader, data_on_host
from vit_fast.syncs import count_host_syncs
from vit_fast.testing import assert_same_batches


def _loaders(backend: str, world_size: int = 1, rank: int = 0, augment: AugmentConfig | None = None,
             size: int = 36, device=None):
    """A device-resident and a host-resident training loader over one small synthetic set, same seed.
    36 images in batches of 8: every epoch ends in a partial batch."""
    ds = datasets.synthetic(size, 10, image_size=16, seed=0)
    mean, std = datasets.channel_stats(ds.images)
    augment = recipes.get_recipe("lee2021").augmentation() if augment is None else augment
    return [DeviceLoader(ds, 8, mean, std, train=True, augment=augment, seed=2, rank=rank, world_size=world_size,
                         backend=backend, device=device, host_images=host) for host in (False, True)]


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
def test_host_loader_yields_the_device_loaders_batches(backend, world_size, rank):
    """lee2021 (policy, erasing, mixing, repeated augmentation) over two epochs, partial last batches
    included, alone and as rank 1 of 2: the staged batches equal the resident ones bit for bit
    ("fused" under Triton's interpreter on a CPU)."""
    resident, staged = _loaders(backend, world_size, rank)
    assert staged.host_images and staged.data.images.device.type == "cpu"
    assert assert_same_batches(resident, staged) >= 6


def test_host_evaluation_batches_are_the_device_loaders():
    ds = datasets.synthetic(21, 10, image_size=16, seed=1)
    mean, std = datasets.channel_stats(ds.images)
    for world_size, rank in ((1, 0), (2, 1)):
        resident, staged = (DeviceLoader(ds, 8, mean, std, train=False, rank=rank, world_size=world_size,
                                         host_images=host) for host in (False, True))
        for (x, y), (xs, ys) in zip(resident, staged, strict=True):
            assert torch.equal(xs, x) and torch.equal(ys, y)


def test_host_data_phase_makes_no_host_syncs():
    _, staged = _loaders("torch")
    batches = iter(staged)
    with count_host_syncs() as counter:
        for _ in range(3):
            with counter.phase("data"):
                next(batches)
    counter.assert_sync_free()


class _FakeEvent:
    made = 0  # events made so far: each is named by its rank, E0, E1, ...

    def __init__(self, log: list) -> None:
        self.log, self.name = log, f"E{_FakeEvent.made}"
        _FakeEvent.made += 1
        log.append(("Event", self.name))

    def record(self, stream) -> None:
        self.log.append(("record", self.name, "on", stream.name))

    def synchronize(self) -> None:
        self.log.append(("host waits for", self.name))


class _FakeStream:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def wait_event(self, event: _FakeEvent) -> None:
        self.log.append(("wait", self.name, "for", event.name))


def test_staging_events_order_the_copies_on_a_cpu(monkeypatch):
    """The CUDA path's protocol, with torch.cuda's streams and events replaced by recording fakes on
    a CPU (the copies run for real): step s's copy goes to pinned buffer and staging half s % 2 on
    the copy stream; before it the host waits for that buffer's copy of step s - 2 and the copy
    stream for the release of step s - 2's batch; the compute stream waits for the copy; the batch's
    release is recorded on the compute stream. And the batches are still the resident loader's."""
    log: list = []
    compute = _FakeStream(log, "compute")

    @contextlib.contextmanager
    def stream(s):
        log.append(("enter", s.name))
        yield
        log.append(("exit", s.name))

    monkeypatch.setattr(_FakeEvent, "made", 0)
    monkeypatch.setattr(torch.cuda, "Event", lambda: _FakeEvent(log))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    resident, staged = _loaders("torch", size=48)  # 6 full batches of 8 per epoch
    staged._copy_stream = _FakeStream(log, "copy")
    steps = 0
    for epoch in (0, 1):
        resident.set_epoch(epoch)
        staged.set_epoch(epoch)
        for (x, y), (xs, ys) in zip(resident, staged, strict=True):
            assert torch.equal(xs, x) and torch.equal(ys, y), f"epoch {epoch} step {steps}"
            copied, consumed = ("E0", "E1") if steps % 2 == 0 else ("E2", "E3")
            first = steps < 2
            expected = [
                *([] if first else [("host waits for", copied), ("wait", "copy", "for", consumed)]),
                ("enter", "copy"), *([("Event", copied)] if first else []), ("record", copied, "on", "copy"),
                ("exit", "copy"), ("wait", "compute", "for", copied),
                *([("Event", consumed)] if first else []), ("record", consumed, "on", "compute"),
            ]
            assert log == expected, f"step {steps}: {log}"
            log.clear()
            steps += 1
    assert steps == 12


def test_staging_errors_name_the_problem():
    _, staged = _loaders("torch")
    with pytest.raises(RuntimeError, match="stage before begin_epoch"):
        staged.stage(8)
    staged.begin_epoch()
    with pytest.raises(ValueError, match="a batch of 9 rows does not fit the staging buffer of 8"):
        staged.stage(9)


def test_data_on_host_choice():
    cuda, cpu, free = torch.device("cuda", 0), torch.device("cpu"), 10_000
    fits = int(DATA_SHARE_OF_FREE * free)
    assert not data_on_host("auto", cuda, fits, free_bytes=free)  # at most the share: on the GPU
    assert data_on_host("auto", cuda, fits + 1, free_bytes=free)  # above it: host memory
    assert not data_on_host("cuda", cuda, 10 * free, free_bytes=free)  # as asked, even when it will not fit
    assert data_on_host("cpu", cuda, 1, free_bytes=free)
    assert not data_on_host("auto", cpu, 10**12) and data_on_host("cpu", cpu, 1)  # a CPU run: host memory
    with pytest.raises(ValueError, match="--data-device cuda keeps the dataset in GPU memory, but the training "
                                         "device is cpu"):
        data_on_host("cuda", cpu, 1)
    with pytest.raises(ValueError, match=r"--data-device must be one of \('auto', 'cuda', 'cpu'\), got 'gpu'"):
        data_on_host("gpu", cuda, 1, free_bytes=free)


def test_data_placement_reads_both_splits_and_says_why():
    train_set = datasets.synthetic(40, 4, image_size=8, seed=0)  # 40 * 3 * 8 * 8 = 7680 bytes
    test_set = datasets.synthetic(10, 4, image_size=8, seed=1)  # 1920 bytes: 9600 in all
    auto = types.SimpleNamespace(data_device="auto")
    cuda = torch.device("cuda", 0)
    on_host, line = run_mod.data_placement(auto, cuda, train_set, test_set, free_bytes=19_199)
    assert on_host and "host memory, each batch copied to the device" in line
    assert "(auto: more than 50% of the GPU's 0.0 GB free)" in line
    on_host, line = run_mod.data_placement(auto, cuda, train_set, test_set, free_bytes=19_200)
    assert not on_host and "(auto: no more than 50%" in line
    assert run_mod.data_placement(auto, torch.device("cpu"), train_set, test_set) == (False, None)
    on_host, line = run_mod.data_placement(types.SimpleNamespace(data_device="cpu"), torch.device("cpu"),
                                           train_set, test_set)
    assert on_host and "staging buffer" in line


def test_cli_data_device(tmp_path):
    assert train_mod.parse_args([]).data_device == "auto"
    with pytest.raises(SystemExit):  # argparse: invalid choice
        train_mod.parse_args(["--data-device", "gpu"])
    args = train_mod.parse_args(["--dataset", "synthetic", "--device", "cpu", "--data-device", "cuda",
                                 "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--data-device cuda keeps the dataset in GPU memory, but the training "
                                         "device is cpu; use --data-device auto or cpu") as err:
        train_mod.main(["--dataset", "synthetic", "--device", "cpu", "--data-device", "cuda",
                        "--out-dir", str(tmp_path)])
    assert err.value.code == 2 and args.data_device == "cuda"
    assert not (tmp_path / "checkpoint.pt").exists()


TINY = ["--dataset", "synthetic", "--synthetic-size", "120", "--synthetic-classes", "5", "--image-size", "16",
        "--dim", "32", "--heads", "2", "--depth", "1", "--batch-size", "32", "--warmup-epochs", "1",
        "--device", "cpu", "--epochs", "2", "--eval-batch-size", "16"]


def test_training_from_host_memory_equals_the_resident_run(tmp_path, capsys):
    """Two epochs of lee2021 (partial last batches) with --data-device cpu and with the default: the
    same weights bit for bit, and the start-up line says where the data is."""
    for name, extra in (("resident", []), ("staged", ["--data-device", "cpu"])):
        train_mod.train(train_mod.parse_args([*TINY, "--out-dir", str(tmp_path / name), *extra]))
    assert "MB of uint8 images in host memory, each batch gathered into a staging buffer" in (
        capsys.readouterr().out)
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("resident", "staged"))
    assert a["epoch"] == b["epoch"] == 2
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


@pytest.mark.gpu(reason="pinned buffers, the copy stream and its events exist only on a GPU")
@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_pinned_host_loader_yields_the_device_loaders_batches_on_cuda(backend):
    resident, staged = _loaders(backend, augment=recipes.get_recipe("lee2021").augmentation(), size=100,
                                device="cuda")
    assert staged._pinned[0].is_pinned() and staged.data.images.device.type == "cpu" and resident.data.images.is_cuda
    assert assert_same_batches(resident, staged, epochs=(0, 1, 2)) >= 30


@pytest.mark.gpu(reason="CUDA graphs need a GPU")
def test_graphed_run_from_host_memory_equals_the_resident_graphed_run(tmp_path):
    """--cuda-graphs with the copy before each replay: the same weights as the resident graphed run."""
    base = [*TINY[:-6], "--device", "cuda", "--cuda-graphs", "--epochs", "2", "--seed", "3"]
    for name, extra in (("resident", ["--data-device", "cuda"]), ("staged", ["--data-device", "cpu"])):
        train_mod.train(train_mod.parse_args([*base, "--out-dir", str(tmp_path / name), *extra]))
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("resident", "staged"))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
