"""model.py against the public reference (open_clip) and against hand-computed values."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model import (CLIP, CLIPConfig, CheckpointError, adamw, clip_loss, clip_loss_reference, cosine_lr,
                   load_state_dict_checked, perceptual_hinge_loss, resuming, save_checkpoint, two_afc_accuracy)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TINY_CONTEXT = CLIPConfig.tiny().context_length


def random_tokens(n, length=77, vocab=49408, generator=None):
    """SOT + random ids + EOT at a random position + zero padding, like real tokenizer output."""
    t = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        end = int(torch.randint(2, length, (1,), generator=generator))
        t[i, 0] = vocab - 2
        t[i, 1:end] = torch.randint(1, vocab - 2, (end - 1,), generator=generator)
        t[i, end] = vocab - 1
    return t


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- open_clip ViT-B-32

@pytest.mark.parametrize("name,quick_gelu", [("ViT-B-32", False), ("ViT-B-32-quickgelu", True)])
def test_matches_open_clip_vit_b32(name, quick_gelu):
    open_clip = pytest.importorskip("open_clip")
    ours = CLIP(CLIPConfig(quick_gelu=quick_gelu)).eval()
    assert sum(p.numel() for p in ours.parameters()) == 151_277_313
    assert len(ours.state_dict()) == 302
    ref = open_clip.create_model(name).eval()
    assert sorted(ref.state_dict()) == sorted(ours.state_dict())
    # their weights -> our model, strictly; then ours -> theirs, strictly
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert v.shape == ours.state_dict()[k].shape, k
    images, tokens = torch.randn(3, 3, 224, 224), random_tokens(3)
    with torch.no_grad():
        ours_out, ref_out = ours(images, tokens), ref(images, tokens)
        ours_logits = ours_out[2] * ours_out[0] @ ours_out[1].T
        ref_logits = ref_out[2] * ref_out[0] @ ref_out[1].T
    for a, b in zip(ours_out, ref_out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-4, rtol=1e-5)  # logits are x100 the features
    # and the activation really differs between the two flavours (the flag is not ignored)
    other = CLIP(CLIPConfig(quick_gelu=not quick_gelu)).eval()
    other.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (other.encode_image(images) - ours.encode_image(images)).abs().max() > 1e-4


def test_logit_scale_init():
    assert math.isclose(CLIP(CLIPConfig.tiny()).logit_scale.exp().item(), 100.0, rel_tol=1e-5)  # PI paper §3.2
    assert math.isclose(CLIP(CLIPConfig.tiny(logit_scale_init=math.log(1 / 0.07))).logit_scale.exp().item(),
                        1 / 0.07, rel_tol=1e-5)


def test_text_init_follows_openai_scheme():
    m = CLIP(CLIPConfig())
    w, L = 512, 12
    assert abs(m.token_embedding.weight.std().item() - 0.02) < 1e-3
    assert abs(m.positional_embedding.std().item() - 0.01) < 1e-3
    assert abs(m.transformer.resblocks[0].attn.out_proj.weight.std().item() - w ** -0.5 * (2 * L) ** -0.5) < 1e-3
    assert abs(m.transformer.resblocks[0].mlp.c_fc.weight.std().item() - (2 * w) ** -0.5) < 1e-3
    assert abs(m.visual.proj.std().item() - 768 ** -0.5) < 2e-3
    assert m.visual.transformer.resblocks[0].attn.in_proj_bias.abs().max() == 0


# ----------------------------------------------------------------------------------------------- clip_loss

def loss_and_gradients(fn, n=16, dim=32, scale=20.0, seed=1):
    """fn's loss and its gradients with respect to image features, text features and the logit scale."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    loss = fn(img, txt, s)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, s.grad


def test_clip_loss_matches_open_clip_value_and_gradients():
    open_clip = pytest.importorskip("open_clip")
    for ours, theirs in zip(loss_and_gradients(clip_loss), loss_and_gradients(open_clip.ClipLoss())):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_fused_clip_loss_equals_the_textbook_form():
    """clip_loss (one logits matrix, recomputed in backward) against clip_loss_reference (two cross-entropies)."""
    fused = loss_and_gradients(clip_loss, n=24, dim=16, scale=30.0, seed=2)
    reference = loss_and_gradients(clip_loss_reference, n=24, dim=16, scale=30.0, seed=2)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_clip_loss_by_hand():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])
    s = 2.0
    logits = s * img @ txt.T
    expected = (-(logits.log_softmax(1).diagonal().mean()) - logits.log_softmax(0).diagonal().mean()) / 2
    torch.testing.assert_close(clip_loss(img, txt, torch.tensor(s)), expected)


def test_clip_loss_torchrun_two_ranks_equals_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "_dist_clip_loss.py"), str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # the same batch in one process
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 16, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(8, 16, generator=g), dim=-1).requires_grad_()
    s = torch.tensor(7.0, requires_grad=True)
    loss = clip_loss(img, txt, s)
    loss.backward()
    # mean of the rank losses = full-batch loss (that is what DDP's gradient averaging optimises)
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach())
    # each rank's feature gradient, after DDP's division by the world size, is the full-batch gradient of its rows
    torch.testing.assert_close(torch.cat([r["gi"] for r in ranks]) / 2, img.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["gt"] for r in ranks]) / 2, txt.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((ranks[0]["gs"] + ranks[1]["gs"]) / 2, s.grad, atol=1e-6, rtol=1e-5)


def test_clip_loss_two_rank_jobs_exit_cleanly_every_time(tmp_path):
    """Ten 2-rank torchrun jobs of the gathered-feature path, each must exit with code 0 on every rank: a rank that
    aborts at exit after writing correct results is what a scheduler reports as a failed job. Three jobs run at a
    time to keep the test short."""
    def start_job(k):
        out = tmp_path / f"job{k}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(ROOT, "tests", "_dist_clip_loss.py"), str(out)]
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        return out, subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    failures = []
    for first in range(0, 10, 3):
        for out, proc in [start_job(k) for k in range(first, min(first + 3, 10))]:
            log, _ = proc.communicate(timeout=180)
            written = all((out / f"rank{r}.pt").exists() for r in range(2))
            if proc.returncode != 0 or not written:
                failures.append(f"{out.name}: exit {proc.returncode}, results written: {written}\n"
                                f"{log.decode()[-600:]}")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------- training mechanics

def test_grad_checkpointing_gives_same_gradients():
    cfg = CLIPConfig.tiny()
    model = CLIP(cfg)
    images, tokens = torch.randn(4, 3, 32, 32), random_tokens(4, length=TINY_CONTEXT)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        clip_loss(*model(images, tokens)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-7, rtol=1e-6, msg=n)


def test_bf16_autocast_forward_backward_on_cpu():
    model = CLIP(CLIPConfig.tiny(grad_checkpointing=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = clip_loss(*model(torch.randn(4, 3, 32, 32), random_tokens(4, length=TINY_CONTEXT)))
    loss.backward()
    assert torch.isfinite(loss) and model.visual.conv1.weight.grad is not None
    assert model.token_embedding.weight.grad.dtype == torch.float32  # parameters stay fp32


def test_adamw_decay_groups_follow_open_clip_rule():
    model = CLIP(CLIPConfig.tiny())
    opt = adamw(model, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    assert "token_embedding.weight" in decay and "visual.proj" in decay and "visual.conv1.weight" in decay
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert {"logit_scale", "ln_final.weight", "visual.class_embedding"} <= no_decay
    assert not any("bias" in n for n in decay)


def test_cosine_lr_schedule():
    assert cosine_lr(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 10, 1.0) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------- perceptual loss

def test_perceptual_hinge_loss_and_2afc_by_hand():
    ref = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    left = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])   # d0 = 0, 1, 0.4
    right = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])  # d1 = 1, 0, 0.4
    # row 0: left is closer; row 1: right is closer; row 2: a tie
    label = torch.tensor([0.0, 1.0, 1.0])  # humans: left, right, right
    # Δd = d0 - d1 = -1, 1, 0; ȳ = -1, 1, 1; max(0, 0.05 - Δd ȳ) = 0, 0, 0.05
    assert perceptual_hinge_loss(ref, left, right, label).item() == pytest.approx(0.05 / 3)
    assert two_afc_accuracy(ref, left, right, label).item() == pytest.approx((1 + 1 + 0.5) / 3)
    flipped = 1 - label  # the opposite human votes: both decided rows become wrong, hinge 0.05 + 1.05 each
    assert two_afc_accuracy(ref, left, right, flipped).item() == pytest.approx(0.5 / 3)
    assert perceptual_hinge_loss(ref, left, right, flipped).item() == pytest.approx((1.05 + 1.05 + 0.05) / 3)
    # margin is a parameter; scale of the embeddings does not matter (cosine distance)
    assert perceptual_hinge_loss(3 * ref, left, 2 * right, label, margin=0.2).item() == pytest.approx(0.2 / 3)


# ----------------------------------------------------------------------------------------------- bad input

def test_checkpoint_errors_name_the_keys(tmp_path):
    model = CLIP(CLIPConfig.tiny())
    sd = model.state_dict()
    bad = dict(sd)
    del bad["ln_final.weight"]
    bad["visual.proj"] = torch.zeros(5, 5)
    bad["extra.thing"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    save_checkpoint(bad, str(path))
    with pytest.raises(CheckpointError) as e:
        load_state_dict_checked(CLIP(CLIPConfig.tiny()), str(path))
    msg = str(e.value)
    assert "bad.pt" in msg and "ln_final.weight" in msg and "extra.thing" in msg and "visual.proj" in msg
    # a vision-only dict where a full model is needed
    vision_only = {k: v for k, v in sd.items() if k.startswith("visual.")}
    with pytest.raises(CheckpointError, match="missing keys.*token_embedding.weight"):
        load_state_dict_checked(CLIP(CLIPConfig.tiny()), vision_only)
    # ... but it is exactly what `--init` takes
    fresh = CLIP(CLIPConfig.tiny())
    load_state_dict_checked(fresh.visual, vision_only, prefix="visual.")
    torch.testing.assert_close(fresh.visual.proj, sd["visual.proj"])
    with pytest.raises(CheckpointError, match="no 'visual.\\*' tensors"):
        load_state_dict_checked(fresh.visual, {"token_embedding.weight": torch.zeros(1)}, prefix="visual.")
    with pytest.raises(CheckpointError, match="not found.*nope.pt"):
        load_state_dict_checked(fresh, str(tmp_path / "nope.pt"))


def test_checkpoint_wrappers_and_atomic_save(tmp_path):
    model = CLIP(CLIPConfig.tiny())
    sd = model.state_dict()
    # open_clip training checkpoints: {'state_dict': {'module.' + key}}; OpenAI's: extra integer entries
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}
    fresh = load_state_dict_checked(CLIP(CLIPConfig.tiny()), wrapped)
    torch.testing.assert_close(fresh.visual.proj, model.visual.proj)
    load_state_dict_checked(CLIP(CLIPConfig.tiny()), dict(sd, input_resolution=224, context_length=77, vocab_size=1))
    path = tmp_path / "m.pt"
    save_checkpoint(sd, str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    assert torch.load(path)["visual.proj"].equal(sd["visual.proj"])


def test_token_ids_beyond_vocabulary_raise_clear_error():
    model = CLIP(CLIPConfig.tiny(vocab_size=1000))
    tokens = random_tokens(2, vocab=1000, length=TINY_CONTEXT)
    model.encode_text(tokens)
    tokens[0, 3] = 1000
    with pytest.raises(ValueError, match="vocabulary has 1000"):
        model.encode_text(tokens)
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(torch.zeros(1, 80, dtype=torch.long))


# ----------------------------------------------------------------------------------------------- transforms

def test_train_transform_applies_same_parameters_to_all_images_of_a_call():
    import numpy as np
    from PIL import Image
    from data import CLIP_MEAN, eval_transform, train_transform
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    t = train_transform(32)
    for seed in range(5):  # whatever crop/jitter/flip/blur was drawn, the three outputs are identical
        torch.manual_seed(seed)
        x, y, z = t(a, a.copy(), a.copy())
        assert x.shape == (3, 32, 32) and torch.equal(x, y) and torch.equal(x, z)
    outs = [t(a) for _ in range(3)]  # ...and the augmentation does vary between calls
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[1], outs[2])
    e = eval_transform(32)(Image.new("RGB", (64, 48), (255, 0, 0)))
    assert e.shape == (3, 32, 32)
    torch.testing.assert_close(e[:, 0, 0], (torch.tensor([1.0, 0, 0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]), atol=1e-3, rtol=0)


def test_loads_torchscript_archive_like_openai_release(tmp_path):
    """OpenAI ships ViT-B-32.pt as a TorchScript archive; load_checkpoint falls back to torch.jit.load for it."""
    import warnings
    model = CLIP(CLIPConfig.tiny()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warns about the token-id check's Python ints
        example = (torch.randn(1, 3, 32, 32), random_tokens(1, length=TINY_CONTEXT))
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    fresh = load_state_dict_checked(CLIP(CLIPConfig.tiny()), str(tmp_path / "ViT-tiny.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_resume_flag_continues_or_starts_and_never_overwrites(tmp_path):
    state = str(tmp_path / "state.pt")
    assert resuming(False, state) is False
    assert resuming(True, state) is False  # --resume on a fresh --out starts the run (a job's first submission)
    save_checkpoint({"step": 1}, state)
    assert resuming(True, state) is True
    with pytest.raises(FileExistsError, match="--resume"):
        resuming(False, state)


def test_old_flag_spellings_still_parse_to_the_new_names(capsys):
    import train_clip
    args = train_clip.get_args(["--train-data", "a.csv", "--out", "o", "--wd", "0.1", "--warmup", "7",
                                "--save-every", "3", "--model", "vit-b-32"])
    assert (args.data, args.weight_decay, args.warmup_steps, args.save_every_steps, args.model) == \
        ("a.csv", 0.1, 7, 3, "ViT-B-32")
    err = capsys.readouterr().err
    assert all(f"{old} is deprecated, use {new}" in err for old, new in
               [("--train-data", "--data"), ("--wd", "--weight-decay"), ("--warmup", "--warmup-steps"),
                ("--save-every", "--save-every-steps")])


def test_one_flag_vocabulary_across_the_training_scripts():
    """Every flag two training scripts share means one thing: same name, same type, same action."""
    import finetune_qkv
    import train_clip
    import train_nights
    parsers = {"train_nights": train_nights.get_parser(), "finetune_qkv": finetune_qkv.get_parser(),
               "train_clip": train_clip.get_parser()}
    shared = ["--data", "--out", "--model", "--seed", "--workers", "--precision", "--grad-checkpointing",
              "--no-augment", "--resume", "--save-every-steps", "--stop-after-steps", "--dist-timeout", "--epochs",
              "--batch-size", "--lr", "--weight-decay", "--beta1", "--beta2", "--eps"]
    for flag in shared:
        actions = {name: next(a for a in p._actions if flag in a.option_strings) for name, p in parsers.items()}
        kinds = {(type(a).__name__, a.dest, a.type) for a in actions.values()}
        assert len(kinds) == 1, (flag, kinds)


def test_config_for_prefers_what_the_run_recorded(tmp_path):
    import json
    from model import config_for
    ckpt = tmp_path / "epoch_1.pt"
    assert config_for(str(ckpt), preset="tiny") == CLIPConfig.tiny()  # nothing recorded: the preset
    (tmp_path / "config.json").write_text(json.dumps({"model": "tiny", "vocab_size": 600}))
    assert config_for(str(ckpt), preset="tiny").vocab_size == 600  # the run's own config, a learned vocabulary
    assert config_for(str(ckpt), saved={"model": "tiny", "vocab_size": 700}).vocab_size == 700
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": "ViT-B-32-quickgelu"}))
    assert config_for(str(ckpt), config=str(other)).quick_gelu  # an explicit --config wins
    with pytest.raises(ValueError, match="not CLIPConfig fields: widht"):
        config_for(str(ckpt), saved={"widht": 3})
