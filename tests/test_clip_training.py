"""train_clip.py on a tiny CLIP (32-px images) on CPU: DDP over 2 gloo ranks and gradient-cache accumulation give the
parameters of one process on the full batch, a killed run resumes to the same parameters, --init loads exactly the
vision tower, and a non-finite loss stops the run with the last good checkpoint intact."""
import datetime
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import _image_text_fixtures as fx
import data
import train_clip
from model import CLIP, CLIPConfig, CheckpointError, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def csv_run(tmp_path):
    # Adam's eps raised from 1e-6: some gradients are exactly zero in theory (the key bias cannot change a softmax)
    # and ~1e-10 float noise in practice, which Adam would blow up to +-lr steps of random sign; with eps 1e-3 the
    # parameter comparisons below measure the gradients, not that noise
    return fx.csv_run_args(tmp_path) + ["--eps", "1e-3", "--log-every", "1"]


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


def tiny_batch(n=12, uint8=False):
    torch.manual_seed(0)
    tokens = torch.randint(1, 598, (n, CLIPConfig.tiny().context_length))
    tokens[:, 20] = 599  # EOT
    if not uint8:
        return torch.randn(n, 3, 32, 32), tokens, None
    params = torch.stack([data.draw_photometric_params(torch.Generator().manual_seed(i)) for i in range(n)])
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), tokens, params


@pytest.mark.parametrize("uint8", [False, True])
def test_gradient_cache_gives_the_full_batch_gradient(uint8):
    """fp32: K chunks give the one-chunk gradient up to float rounding -- also when each chunk is uint8 and is
    augmented on the device twice (embedding without a graph, then again with one)."""
    images, tokens, params = tiny_batch(uint8=uint8)
    model = CLIP(CLIPConfig.tiny(vocab_size=600))
    grads = []
    for accum in (1, 4):
        model.zero_grad()
        loss = train_clip.train_step(model, images, tokens, accum, torch.autocast("cpu", enabled=False), params=params)
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l4, g4) = grads
    torch.testing.assert_close(l1, l4)
    for n in g1:  # equal up to float rounding, relative to the tensor's largest gradient
        assert (g4[n] - g1[n]).abs().max() <= 1e-5 * g1[n].abs().max(), n
    assert g1["logit_scale"].abs() > 0 and g1["visual.conv1.weight"].abs().max() > 0


def test_gradient_cache_in_bf16_differs_from_one_chunk_by_rounding_only():
    """What the README states: in bf16 autocast, K chunks round differently from one chunk; the weight gradients
    differ by about 1-2% relative (here: under 5%), the size of bf16's own error against fp32."""
    images, tokens, params = tiny_batch(uint8=True)
    model = CLIP(CLIPConfig.tiny(vocab_size=600))
    grads = {}
    for accum, precision in ((1, "fp32"), (1, "bf16"), (4, "bf16")):
        model.zero_grad()
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        train_clip.train_step(model, images, tokens, accum, amp, params=params)
        grads[accum, precision] = torch.cat([p.grad.flatten() for p in model.parameters()])
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    chunked, bf16_error = rel(grads[4, "bf16"], grads[1, "bf16"]), rel(grads[1, "bf16"], grads[1, "fp32"])
    assert 0 < chunked < 0.05 and chunked < 3 * bf16_error


def run_ddp_grads(tmp_path, csv_path, merges, world, accum):
    out = str(tmp_path / f"grads_{world}_{accum}.pt")
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(free_port())]
    cmd = [sys.executable, *(launch if world > 1 else []), os.path.join(ROOT, "tests", "_ddp_grads.py"), csv_path,
           merges, "8", str(accum), out]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, cwd=ROOT, timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


def test_ddp_2_ranks_gives_the_gradients_of_one_process(tmp_path):
    """The raw parameter gradients of one step (no optimiser in between to hide a factor), 2 gloo ranks x 2
    gradient-cache chunks each against one process on the whole global batch of 8."""
    csv_path = fx.write_csv(tmp_path / "csv", n_good=16, extra_bad=False)
    merges, _ = fx.learned_tokenizer(tmp_path)
    one, two = (run_ddp_grads(tmp_path, csv_path, merges, world, accum) for world, accum in ((1, 1), (2, 2)))
    assert one.keys() == two.keys()

    def close(a, b):  # float rounding, relative to the tensor's largest gradient
        return (a - b).abs().max() <= 1e-4 * b.abs().max()
    for name in one:
        assert one[name].abs().max() > 0, name
        assert close(two[name], one[name]), name
        assert not close(2 * two[name], one[name]) and not close(two[name] / 2, one[name])  # a world-size factor fails


def test_accum_steps_4_equals_full_batch(csv_run, tmp_path):
    # 16 rows, global batch 8: 2 steps in the epoch
    train_clip.main(csv_run + ["--batch-size", "8", "--epochs", "1", "--out", str(tmp_path / "a1")])
    train_clip.main(csv_run + ["--batch-size", "8", "--epochs", "1", "--accum-steps", "4",
                               "--out", str(tmp_path / "a4")])
    assert_trained(tmp_path / "a1", tmp_path)
    assert_same_weights(weights(tmp_path / "a1", "epoch_1.pt"), weights(tmp_path / "a4", "epoch_1.pt"))
    log = [json.loads(line) for line in open(tmp_path / "a4" / "log.jsonl")]
    first = log[0]
    assert {"step", "samples", "loss", "lr", "logit_scale", "samples_per_s", "host_wait", "augment",
            "skipped"} <= set(first)
    assert [r["samples"] for r in log if "loss" in r] == [8, 16]


@pytest.mark.filterwarnings("ignore:.*keeping the samples before it")
def test_killed_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    """Tar shards, 2 workers: an epoch is 4 steps; state.pt is written at step 2 (mid-epoch) and 4. The run is
    killed in step 4; --resume restarts from step 2, replays the data streams to where they were, and ends where an
    uninterrupted run ends. --stop-after-steps is the planned version: state.pt at that step, then the same end."""
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=2, per_shard=8)
    merges, _ = fx.learned_tokenizer(tmp_path)
    args = ["--model", "tiny", "--data", pattern, "--train-num-samples", "16", "--merges", merges,
            "--batch-size", "4", "--epochs", "2", "--lr", "2e-3", "--warmup-steps", "2", "--workers", "2",
            "--save-every-steps", "2", "--shuffle-buffer", "4"]
    train_clip.main(args + ["--out", str(tmp_path / "full")])
    real_step = train_clip.optimizer_step

    def killed_in_step_4(*a, **kw):
        if kw["progress"].step == 3:
            raise KeyboardInterrupt("killed")
        return real_step(*a, **kw)

    out = str(tmp_path / "crash")
    monkeypatch.setattr(train_clip, "optimizer_step", killed_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_clip.main(args + ["--out", out])
    monkeypatch.setattr(train_clip, "optimizer_step", real_step)
    assert not os.path.exists(os.path.join(out, "epoch_1.pt"))
    assert load_checkpoint(os.path.join(out, "state.pt"))["step"] == 2
    with pytest.raises(FileExistsError, match="--resume"):  # a restart without --resume must not clobber it
        train_clip.main(args + ["--out", out])
    train_clip.main(args + ["--out", out, "--resume"])
    for name in ("epoch_1.pt", "epoch_2.pt"):
        assert_same_weights(weights(tmp_path / "full", name), weights(out, name), atol=0, rtol=0)
    # the resumed log continues the same file, without the step 3 the killed run logged after its state.pt at 2
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl")) if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]

    paused = str(tmp_path / "paused")
    train_clip.main(args + ["--out", paused, "--stop-after-steps", "3"])
    assert load_checkpoint(os.path.join(paused, "state.pt"))["step"] == 3
    train_clip.main(args + ["--out", paused, "--resume"])
    assert_same_weights(weights(tmp_path / "full", "epoch_2.pt"), weights(paused, "epoch_2.pt"), atol=0, rtol=0)


def test_init_loads_exactly_the_vision_tower(csv_run, tmp_path):
    _, tok = fx.learned_tokenizer(tmp_path)
    torch.manual_seed(123)
    stage1 = CLIP(CLIPConfig.tiny(vocab_size=tok.vocab_size))
    torch.save(stage1.state_dict(), tmp_path / "nights.pt")
    args = csv_run + ["--batch-size", "8", "--stop-after-steps", "0"]
    model = train_clip.main(args + ["--out", str(tmp_path / "pi"), "--init", str(tmp_path / "nights.pt")])
    fresh = train_clip.main(args + ["--out", str(tmp_path / "baseline")])  # the same seed without --init
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
        train_clip.main(csv_run + ["--batch-size", "4", "--out", str(out), "--save-every-steps", "1"])
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


def last_counts(out):
    """The skip and re-read counts of the last step logged in a run's log.jsonl."""
    last = [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"loss"' in line][-1]
    return last["skipped"], last["reread"]


def torchrun(args, world=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(free_port()), os.path.join(ROOT, "train_clip.py")] + args
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, cwd=ROOT, timeout=300, capture_output=True, text=True)


def test_skip_counts_survive_resume_on_2_ranks(tmp_path):
    """Each rank's skip counters are kept in state.pt and the replayed samples are not counted again: a killed and
    resumed 2-rank run logs the counts of the unbroken one."""
    pattern, _ = fx.broken_shards(tmp_path / "shards")
    merges, _ = fx.learned_tokenizer(tmp_path)
    args = ["--model", "tiny", "--data", pattern, "--merges", merges, "--batch-size", "4", "--epochs", "2",
            "--workers", "1", "--save-every-steps", "2", "--shuffle-buffer", "2"]
    full = torchrun(args + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    out = str(tmp_path / "crash")
    assert torchrun(args + ["--out", out, "--stop-after-steps", "5"]).returncode == 0
    assert load_checkpoint(os.path.join(out, "state.pt"))["step"] == 5  # mid-epoch: the resume replays the streams
    resumed = torchrun(args + ["--out", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped, reread = last_counts(tmp_path / "full")
    assert sum(skipped.values()) > 0
    assert last_counts(out) == (skipped, reread)


def test_epoch_checkpoint_is_written_before_state(csv_run, tmp_path, monkeypatch):
    """A run killed while writing epoch_1.pt resumes from the state before that epoch's end and still produces
    epoch_1.pt (written after it, state.pt would say the epoch was done and epoch_1.pt would never come)."""
    args = csv_run + ["--batch-size", "8", "--epochs", "2", "--save-every-steps", "1"]
    train_clip.main(args + ["--out", str(tmp_path / "full")])
    real_save = train_clip.save_checkpoint

    def dies_at_epoch_1(obj, path):
        if path.endswith("epoch_1.pt"):
            raise KeyboardInterrupt("killed")
        real_save(obj, path)

    monkeypatch.setattr(train_clip, "save_checkpoint", dies_at_epoch_1)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_clip.main(args + ["--out", str(out)])
    assert load_checkpoint(out / "state.pt")["step"] == 1 and not (out / "epoch_1.pt").exists()
    monkeypatch.setattr(train_clip, "save_checkpoint", real_save)
    train_clip.main(args + ["--out", str(out), "--resume"])
    for name in ("epoch_1.pt", "epoch_2.pt"):
        assert_same_weights(weights(tmp_path / "full", name), weights(out, name), atol=0, rtol=0)


def test_fresh_run_starts_a_new_log(csv_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 99, "loss": 1.0}\n')  # an old run's log, without its state.pt
    train_clip.main(csv_run + ["--batch-size", "8", "--epochs", "1", "--out", str(out)])
    steps = [json.loads(line).get("step") for line in open(out / "log.jsonl")]
    assert steps == [1, 2, 2]  # two steps, then the epoch's end


def test_checkpoints_get_ordinary_permissions(csv_run, tmp_path):
    old = os.umask(0o022)
    try:
        train_clip.main(csv_run + ["--batch-size", "8", "--epochs", "1", "--out", str(tmp_path / "run")])
    finally:
        os.umask(old)
    for name in ("state.pt", "epoch_1.pt"):
        assert os.stat(tmp_path / "run" / name).st_mode & 0o777 == 0o644, name  # mkstemp alone gives 0600


def test_dist_timeout_reaches_init_process_group(csv_run, tmp_path, monkeypatch):
    import model
    seen = {}
    monkeypatch.setattr(model.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(model.torch.cuda, "is_available", lambda: False)
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    d = model.setup_distributed(timeout_minutes=45)
    assert seen == dict(backend="gloo", timeout=datetime.timedelta(minutes=45)) and d.rank == 0
    assert train_clip.get_args(["--data", "x.csv", "--out", "o"]).dist_timeout >= 30  # > NCCL's 10 minutes
    asked = []
    monkeypatch.setattr(train_clip, "setup_distributed",
                        lambda timeout_minutes: asked.append(timeout_minutes) or model.Dist())
    train_clip.main(csv_run + ["--batch-size", "8", "--out", str(tmp_path / "run"), "--stop-after-steps", "0",
                               "--dist-timeout", "90"])
    assert asked == [90]
