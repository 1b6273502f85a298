"""Training across machines, rehearsed on one: two torchrun agents as two "nodes" (``--nnodes 2``,
one process each, c10d rendezvous on the loopback address, gloo between CPU processes) run a whole
short training and a ``--resume``, as the README's two-machine launch does, and end with the
weights of one process (tests/test_distributed.py's reference run and tolerance)."""

import os
import subprocess
import sys

from test_distributed import TINY, assert_same_weights, free_port, reference  # noqa: F401 (a fixture)

from vit_fast.checkpoint import load_checkpoint


def two_nodes(out_dir, *extra, timeout=240) -> str:
    """Both agents' output, after both have exited with status 0."""
    port = free_port()
    # gloo's own choice of interface goes through the host name; name the loopback interface instead.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    procs = []
    try:
        for node in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", "two-nodes", "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", "127.0.0.1",
                   "-m", "vit_fast.train", *TINY, "--out-dir", str(out_dir), *extra]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log = "\n".join(f"--- node {n} ---\n{out}" for n, out in enumerate(outputs))
    assert all(p.returncode == 0 for p in procs), log
    return log


def test_two_nodes_train_and_resume_like_one_process(tmp_path, reference):  # noqa: F811
    log = two_nodes(tmp_path, "--stop-after", "1")
    assert "global batch 128 = 2 ranks x 64 per rank (gloo)" in log and log.count("epoch   1/2") == 1
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 3 and len(ckpt["rng_ranks"]) == 2
    epoch1, epoch2 = reference
    assert_same_weights(ckpt["model"], epoch1["model"])

    log = two_nodes(tmp_path, "--resume")
    assert "resuming after epoch 1" in log and log.count("epoch   2/2") == 1
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6
    assert_same_weights(ckpt["model"], epoch2["model"])
