"""train_clip.py on a tiny CLIP (32-px images) on CPU: DDP over 2 gloo ranks and gradient-cache accumulation give the
parameters of one process on the full batch, a killed run resumes to the same parameters, --init loads exactly the
vision tower, and a non-finite loss stops the run with the last good checkpoint intact."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import _image_text_fixtures as fx
import train_clip
from model import CLIP, CLIPConfig, CheckpointError, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def csv_run(tmp_path):
    path = fx.write_csv(tmp_path / "csv", n_good=16, extra_bad=False)
    merges, _ = fx.learned_tokenizer(tmp_path)
    # Adam's eps raised from 1e-6: some gradients are exactly zero in theory (the key bias cannot change a softmax)
    # and ~1e-10 float noise in practice, which Adam would blow up to +-lr steps of random sign; with eps 1e-3 the
    # parameter comparisons below measure the gradients, not that noise
    return ["--model", "tiny", "--train-data", path, "--merges", merges, "--lr", "2e-3", "--warmup", "1",
            "--eps", "1e-3", "--seed", "0", "--workers", "0", "--log-every", "1"]


def weights(out, name):
    return load_checkpoint(os.path.join(out, name))


def assert_same_weights(a, b, atol=1e-5, rtol=1e-4):
    """Within float noise: the updates themselves are ~lr = 2e-3 per step."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)


def assert_trained(out, tmp_path):
    """The comparison means something only if the weights moved."""
    init = CLIP(CLIPConfig.tiny(vocab_size=fx.learned_tokenizer(tmp_path)[1].vocab_size)).state_dict()
    trained = weights(out, "epoch_1.pt")
    assert max((trained[k] - init[k]).abs().max().item() for k in init) > 1e-3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradient_cache_gives_the_full_batch_gradient():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.tiny(vocab_size=600))
    images, tokens = torch.randn(12, 3, 32, 32), torch.randint(1, 598, (12, 77))
    tokens[:, 20] = 599  # EOT
    grads = []
    for accum in (1, 4):
        model.zero_grad()
        loss = train_clip.train_step(model, images, tokens, accum, torch.autocast("cpu", enabled=False))
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l4, g4) = grads
    torch.testing.assert_close(l1, l4)
    for n in g1:  # equal up to float rounding, relative to the tensor's largest gradient
        assert (g4[n] - g1[n]).abs().max() <= 1e-5 * g1[n].abs().max(), n
    assert g1["logit_scale"].abs() > 0 and g1["visual.conv1.weight"].abs().max() > 0


def test_accum_steps_4_equals_full_batch(csv_run, tmp_path):
    # 16 rows, global batch 8: 2 steps in the epoch
    train_clip.main(csv_run + ["--batch-size", "8", "--epochs", "1", "--out", str(tmp_path / "a1")])
    train_clip.main(csv_run + ["--batch-size", "8", "--epochs", "1", "--accum-steps", "4",
                               "--out", str(tmp_path / "a4")])
    assert_trained(tmp_path / "a1", tmp_path)
    assert_same_weights(weights(tmp_path / "a1", "epoch_1.pt"), weights(tmp_path / "a4", "epoch_1.pt"))
    log = [json.loads(line) for line in open(tmp_path / "a4" / "log.jsonl")]
    first = log[0]
    assert {"step", "samples", "loss", "lr", "logit_scale", "samples_per_s", "data_wait", "skipped"} <= set(first)
    assert [r["samples"] for r in log if "loss" in r] == [8, 16]


def test_torchrun_2_ranks_with_accumulation_equals_one_process(csv_run, tmp_path):
    """2 gloo ranks x 2 gradient-cache chunks each vs one process on the whole batch: same parameters."""
    args = csv_run + ["--batch-size", "8", "--epochs", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "train_clip.py")] + args + ["--accum-steps", "2", "--out", str(tmp_path / "ddp")]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=180, capture_output=True)
    train_clip.main(args + ["--out", str(tmp_path / "one")])
    assert_trained(tmp_path / "one", tmp_path)
    assert_same_weights(weights(tmp_path / "ddp", "epoch_1.pt"), weights(tmp_path / "one", "epoch_1.pt"))
    # the logged loss is the full-batch loss in both runs
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "log.jsonl") if '"loss"' in line]
              for run in ("ddp", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*unexpected end of data")
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    """Tar shards, 2 workers: an epoch is 4 steps; state.pt is written at step 2 (mid-epoch) and 4. The run 'dies'
    after step 3; --resume restarts from step 2, replays the data streams to where they were, and ends where an
    uninterrupted run ends."""
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=2, per_shard=8)
    merges, _ = fx.learned_tokenizer(tmp_path)
    args = ["--model", "tiny", "--train-data", pattern, "--train-num-samples", "16", "--merges", merges,
            "--batch-size", "4", "--epochs", "2", "--lr", "2e-3", "--warmup", "2", "--workers", "2",
            "--save-every", "2", "--shuffle-buffer", "4"]
    train_clip.main(args + ["--out", str(tmp_path / "full")])
    out = str(tmp_path / "crash")
    train_clip.main(args + ["--out", out, "--stop-after-steps", "3"])
    assert not os.path.exists(os.path.join(out, "epoch_1.pt"))
    assert load_checkpoint(os.path.join(out, "state.pt"))["step"] == 2
    with pytest.raises(FileExistsError, match="--resume"):  # a restart without --resume must not clobber it
        train_clip.main(args + ["--out", out])
    train_clip.main(args + ["--out", out, "--resume"])
    for name in ("epoch_1.pt", "epoch_2.pt"):
        assert_same_weights(weights(tmp_path / "full", name), weights(out, name), atol=0, rtol=0)
    # the resumed log continues the same file: steps 1-3, then 3-8 again from the checkpoint at 2
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl")) if '"loss"' in line]
    assert steps == [1, 2, 3, 3, 4, 5, 6, 7, 8]


def test_init_loads_exactly_the_vision_tower(csv_run, tmp_path):
    _, tok = fx.learned_tokenizer(tmp_path)
    torch.manual_seed(123)
    stage1 = CLIP(CLIPConfig.tiny(vocab_size=tok.vocab_size))
    torch.save(stage1.state_dict(), tmp_path / "nights.pt")
    args = csv_run + ["--batch-size", "8", "--out", str(tmp_path / "run"), "--stop-after-steps", "0"]
    model = train_clip.main(args + ["--init", str(tmp_path / "nights.pt")])
    fresh = train_clip.main(args)  # the same seed without --init
    src, got, rnd = stage1.state_dict(), model.state_dict(), fresh.state_dict()
    for k in got:
        if k.startswith("visual."):
            assert torch.equal(got[k], src[k]), k
        else:  # text tower and logit scale: the run's own random init, not the checkpoint's
            assert torch.equal(got[k], rnd[k]), k
    assert not torch.equal(got["token_embedding.weight"], src["token_embedding.weight"])


def test_init_rejects_other_architectures_clearly(csv_run, tmp_path):
    args = csv_run + ["--batch-size", "8", "--out", str(tmp_path / "run"), "--stop-after-steps", "0"]
    other = CLIP(CLIPConfig.tiny(vision_width=48, vision_heads=2)).state_dict()
    torch.save(other, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: visual\."):
        train_clip.main(args + ["--init", str(tmp_path / "wide.pt")])
    torch.save({k: v for k, v in other.items() if not k.startswith("visual.")}, tmp_path / "text_only.pt")
    with pytest.raises(CheckpointError, match=r"holds no 'visual\.\*' tensors"):
        train_clip.main(args + ["--init", str(tmp_path / "text_only.pt")])


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(csv_run, tmp_path, monkeypatch):
    calls, real_loss = [], train_clip.clip_loss

    def loss_going_nan(image_f, text_f, scale):  # the third step's loss is NaN
        calls.append(1)
        return real_loss(image_f, text_f, scale) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(train_clip, "clip_loss", loss_going_nan)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"at step 3; the last good checkpoint is .*state\.pt"):
        train_clip.main(csv_run + ["--batch-size", "4", "--out", str(out), "--save-every", "1"])
    state = load_checkpoint(out / "state.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_zero_shot_check_at_each_epoch_end(csv_run, tmp_path, monkeypatch):
    """The seam to evaluate.py: zero_shot_eval runs on the model at every epoch end, on each set's folder under
    --zeroshot-root, and lands in the log; a failing set is logged, not fatal; an unknown name fails at once."""
    import evaluate
    seen = []

    def fake_eval(model, tokenizer, name, root, **kw):
        seen.append((name, os.path.basename(root)))
        if name == "cifar100":
            raise evaluate.DatasetUnavailable("no files")
        return {"top1": 1.0, "top5": 2.0}

    monkeypatch.setattr(evaluate, "zero_shot_eval", fake_eval)
    out = tmp_path / "zs"
    train_clip.main(csv_run + ["--batch-size", "8", "--epochs", "2", "--out", str(out),
                               "--zeroshot", "cifar10,cifar100", "--zeroshot-root", str(tmp_path)])
    assert seen == [("cifar10", "cifar10"), ("cifar100", "cifar100")] * 2
    ends = [json.loads(line) for line in open(out / "log.jsonl") if "zeroshot" in line]
    assert [e["zeroshot"]["cifar10"]["top1"] for e in ends] == [1.0, 1.0]
    assert "DatasetUnavailable" in ends[0]["zeroshot"]["cifar100"]["error"]
    with pytest.raises(SystemExit, match="unknown --zeroshot set: imagenet"):
        train_clip.main(csv_run + ["--batch-size", "8", "--out", str(out), "--zeroshot", "imagenet"])
