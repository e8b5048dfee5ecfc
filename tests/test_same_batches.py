"""The comparison PI exists for: a run and its control see the same batches wherever they run. train_clip.py on
tar shards gives the same weights after N steps on 1 process x 1 worker, 1 x 3, 2 ranks x 2 workers and 3 x 1
(fp32 tolerance), and a run stopped on 2 ranks and resumed on 1 ends where the unbroken one does. A different
sample order (another --data-streams) moves the weights well past that tolerance, so the comparison can fail."""
import os
import subprocess
import sys

import pytest
import torch

import _image_text_fixtures as fx
import train_clip
from model import load_checkpoint
from test_clip_training import ROOT, free_port
from test_image_text_data import uneven_shards


@pytest.fixture
def tar_run(tmp_path):
    pattern = uneven_shards(tmp_path / "shards")
    merges, _ = fx.learned_tokenizer(tmp_path)
    # 140 samples: 5 steps of 24 per epoch; the 12 streams share out over 1, 2, 3 ranks and 1-3 workers
    return ["--model", "tiny", "--data", pattern, "--merges", merges, "--batch-size", "24", "--epochs", "2",
            "--data-streams", "12", "--shuffle-buffer", "5", "--lr", "2e-3", "--warmup-steps", "1", "--eps", "1e-3",
            "--seed", "0", "--stop-after-steps", "7"]


def run(args, out, world=1):
    """train_clip.py in its own process(es): one plain process, or torchrun with `world` gloo ranks."""
    launch = ([sys.executable] if world == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(free_port())])
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run(launch + [os.path.join(ROOT, "train_clip.py"), *args, "--out", str(out)], env=env,
                          cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_checkpoint(os.path.join(out, "state.pt"))


def max_difference(a, b):
    return max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])


def test_same_weights_on_any_ranks_x_workers_and_after_an_elastic_resume(tar_run, tmp_path):
    reference = run(tar_run + ["--workers", "1"], tmp_path / "1x1")
    assert reference["step"] == 7  # 5 steps of epoch 1 and 2 of epoch 2: across the epoch boundary
    for world, workers in ((1, 3), (2, 2), (3, 1)):
        other = run(tar_run + ["--workers", str(workers)], tmp_path / f"{world}x{workers}", world=world)
        assert max_difference(reference, other) < 1e-5, (world, workers)
    # stopped mid-epoch on 2 ranks, resumed on 1 process with 2 workers: the same remaining batches
    out = tmp_path / "elastic"
    run([a if a != "7" else "3" for a in tar_run] + ["--workers", "2"], out, world=2)
    assert max_difference(reference, run(tar_run + ["--workers", "2", "--resume"], out)) < 1e-5
    # another order of the same data: far outside the tolerance above
    reordered = run([a if a != "12" else "6" for a in tar_run] + ["--workers", "1"], tmp_path / "reordered")
    assert max_difference(reference, reordered) > 1e-3


def test_state_records_every_streams_position(tar_run, tmp_path):
    """state.pt holds one position per stream, whoever read it, and the order's parameters."""
    train_clip.main([a if a != "7" else "3" for a in tar_run] + ["--workers", "0", "--out", str(tmp_path / "r")])
    state = load_checkpoint(tmp_path / "r" / "state.pt")
    assert state["data"]["streams"] == 12 and sorted(state["data"]["positions"]) == list(range(12))
    assert all(pos >= 3 * 2 for pos in state["data"]["positions"].values())  # 3 steps x 2 samples per stream
    assert torch.is_tensor(state["model"]["logit_scale"])
