"""NIGHTS data, stage 1 (train_nights.py) and the perceptual fine-tuning baseline (finetune_qkv.py), on small real
files written by tests/nights_fixture.py. No network; everything on CPU with the tiny CLIP."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import finetune_qkv
import train_nights
from data import NightsTriplets, eval_transform, read_nights_csv
from model import CLIP, CLIPConfig, CheckpointError, load_checkpoint, load_state_dict_checked
from nights_fixture import make_nights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = {"train": 96, "val": 48, "test": 10}
# the stage-1 recipe for the tiny runs: no augmentation (20% grayscale would erase the colour rule of the fixture)
TINY = ["--model", "tiny", "--workers", "0", "--batch-size", "16", "--lr", "1e-3", "--warmup-epochs", "0.5"]


@pytest.fixture(autouse=True)
def _one_thread():
    # these models and images are tiny: one intra-op thread is faster than two on a shared 2-core machine
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nights"))
    make_nights(root, COUNTS)
    return root


@pytest.fixture(scope="module")
def stage1(nights, tmp_path_factory):
    """One tiny stage-1 run shared by the tests that need a trained nights.pt."""
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp("stage1"))
    # seed 1: a random init whose val 2AFC on the fixture is at chance (0.50), so the lift is learning, not luck
    result = train_nights.main(["--data", nights, "--out", out, "--epochs", "3", "--no-augment", "--seed", "1"] + TINY)
    return out, result


def tensors_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# --- data -------------------------------------------------------------------------------------------------------


def test_rows_votes_and_splits(nights):
    rows = {s: read_nights_csv(nights, s) for s in ("train", "val", "test", "test_imagenet", "test_no_imagenet")}
    for split in ("train", "val", "test"):
        assert len(rows[split]) == COUNTS[split]  # the 3 rows per split with votes < 6 are dropped
        assert all(r["split"] == split and float(r["votes"]) >= 6 for r in rows[split])
    assert all(r["is_imagenet"] == "True" for r in rows["test_imagenet"])
    assert all(r["is_imagenet"] == "False" for r in rows["test_no_imagenet"])
    assert len(rows["test_imagenet"]) > 0 and len(rows["test_no_imagenet"]) > 0
    ids = lambda rs: sorted(r["id"] for r in rs)  # noqa: E731
    assert ids(rows["test_imagenet"] + rows["test_no_imagenet"]) == ids(rows["test"])
    assert len(read_nights_csv(nights, "train", min_votes=0)) == COUNTS["train"] + 3


def test_items_label_direction_and_preprocessing(nights):
    ds = NightsTriplets(nights, "val", image_size=32)
    t = eval_transform(32)
    for i in (0, 1, 2, 3):
        row = ds.rows[i]
        ref, left, right, label = ds[i]
        assert label.item() == float(row["right_vote"])  # 1 = the RIGHT image x~1 is the more similar one
        for got, key in ((ref, "ref_path"), (left, "left_path"), (right, "right_path")):
            assert got.shape == (3, 32, 32)
            assert torch.equal(got, t(Image.open(os.path.join(nights, row[key])).convert("RGB")))
    assert {ds[i][3].item() for i in range(len(ds))} == {0.0, 1.0}


def test_augmentation_same_parameters_for_the_whole_triplet(tmp_path):
    # a triplet of three identical images: with shared random parameters the three outputs must stay identical,
    # while independent draws would almost surely differ
    root = str(tmp_path)
    make_nights(root, {"train": 4, "val": 1, "test": 1})
    ds = NightsTriplets(root, "train", image_size=32)
    for r in ds.rows:
        r["left_path"] = r["right_path"] = r["ref_path"]
    aug = NightsTriplets(root, "train", image_size=32, augment=True, seed=5)
    aug.rows = ds.rows
    before = torch.get_rng_state()
    outs = [aug[i] for i in range(len(aug))]
    assert torch.equal(torch.get_rng_state(), before)  # per-sample generators: the global RNG is untouched
    for ref, left, right, _ in outs:
        assert torch.equal(ref, left) and torch.equal(ref, right)
    plain = ds[0][0]
    assert any(not torch.equal(o[0], plain) for o in outs)  # the augmentation did something
    # reproducible per (seed, epoch, index); a new epoch draws new parameters
    assert all(torch.equal(aug[i][0], outs[i][0]) for i in range(len(aug)))
    aug.set_epoch(1)
    assert any(not torch.equal(aug[i][0], outs[i][0]) for i in range(len(aug)))


def test_subset_is_fixed_fraction(nights):
    full = NightsTriplets(nights, "train", 32)
    half = NightsTriplets(nights, "train", 32, subset=0.5, seed=1)
    again = NightsTriplets(nights, "train", 32, subset=0.5, seed=7)  # the training seed does not move the subset
    other = NightsTriplets(nights, "train", 32, subset=0.5, subset_seed=1)
    ids = lambda d: [r["id"] for r in d.rows]  # noqa: E731
    assert len(half) == COUNTS["train"] // 2 and ids(half) == ids(again) != ids(other)
    assert set(ids(half)) <= set(ids(full)) and ids(half) == sorted(ids(half), key=int)
    assert len(NightsTriplets(nights, "train", 32, subset=0.01)) == 1
    with pytest.raises(ValueError, match="subset"):
        NightsTriplets(nights, "train", 32, subset=0)


def test_bad_input_messages(nights, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.csv"):
        NightsTriplets(str(tmp_path), "train")
    with pytest.raises(ValueError, match="unknown NIGHTS split 'dev'.*test_no_imagenet"):
        NightsTriplets(nights, "dev")
    broken = str(tmp_path / "broken")
    shutil.copytree(nights, broken)
    victim = read_nights_csv(broken, "train")[3]["left_path"]
    os.remove(os.path.join(broken, victim))
    with pytest.raises(FileNotFoundError, match=f"1 of the 288 images .*'train'.*{victim}"):
        NightsTriplets(broken, "train")
    NightsTriplets(broken, "val")  # other splits are fine
    # the script stops before training: nothing but the error
    out = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=victim):
        train_nights.main(["--data", broken, "--out", out] + TINY)
    assert not os.path.exists(os.path.join(out, "state.pt"))


# --- stage 1 ----------------------------------------------------------------------------------------------------


def test_stage1_learns_and_leaves_text_tower(stage1):
    out, result = stage1
    init, last = result["init"]["val_2afc"], result["last"]["val_2afc"]
    print(f"synthetic NIGHTS val 2AFC: init {init:.1f}% -> after 3 epochs {last:.1f}%")
    assert init <= 60 and last >= 90  # percent, as evaluate.py reports it
    torch.manual_seed(1)
    fresh = CLIP(CLIPConfig.tiny()).state_dict()  # the same random init the run started from
    trained = load_checkpoint(os.path.join(out, "nights.pt"))
    assert trained.keys() == fresh.keys()
    for k in fresh:
        if k.startswith("visual."):
            continue
        assert tensors_equal(trained[k], fresh[k]), k  # text tower and logit scale bit-identical
    assert not torch.equal(trained["visual.proj"], fresh["visual.proj"])
    # artefacts: config, log (epoch 0 = init, then 3 epochs), last / best, nights.pt = last (the default)
    assert CLIPConfig(**json.load(open(os.path.join(out, "config.json")))) == CLIPConfig.tiny()
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3] and "val_2afc" in log[-1] and "train_loss" in log[-1]
    last_pt = load_checkpoint(os.path.join(out, "last.pt"))
    assert all(torch.equal(last_pt[k], trained[k]) for k in trained)
    assert os.path.isfile(os.path.join(out, "best.pt"))


def test_nights_pt_loads_as_init(stage1):
    out, _ = stage1
    fresh = CLIP(CLIPConfig.tiny())
    load_state_dict_checked(fresh.visual, os.path.join(out, "nights.pt"), prefix="visual.")  # train_clip.py --init
    CLIP(CLIPConfig.tiny()).load_state_dict(load_checkpoint(os.path.join(out, "nights.pt")), strict=True)


def test_resume_matches_uninterrupted_run(nights, tmp_path):
    # augmentation ON, so resuming must also reproduce the per-sample augmentation draws and the data order
    args = ["--data", nights, "--epochs", "2", "--subset", "0.5", "--seed", "3"] + TINY  # 3 steps per epoch
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train_nights.main(args + ["--out", whole])
    assert train_nights.main(args + ["--out", parts, "--stop-after-steps", "4"]) is None  # dies mid epoch 2
    assert not os.path.exists(os.path.join(parts, "nights.pt"))
    assert load_checkpoint(os.path.join(parts, "state.pt"))["step"] == 4
    with pytest.raises(FileExistsError, match="--resume"):
        train_nights.main(args + ["--out", parts])  # never silently overwrites a run
    train_nights.main(args + ["--out", parts, "--resume"])
    a, b = load_checkpoint(os.path.join(whole, "nights.pt")), load_checkpoint(os.path.join(parts, "nights.pt"))
    assert all(tensors_equal(a[k], b[k]) for k in a)
    sa, sb = load_checkpoint(os.path.join(whole, "state.pt")), load_checkpoint(os.path.join(parts, "state.pt"))
    assert sa["step"] == sb["step"] == 6
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(ga[k], gb[k]) for k in ga)
    la = [json.loads(x) for x in open(os.path.join(whole, "log.jsonl"))]
    lb = [json.loads(x) for x in open(os.path.join(parts, "log.jsonl"))]
    drop = lambda r: {k: v for k, v in r.items() if k not in ("epoch_s", "time")}  # noqa: E731
    assert [drop(r) for r in la] == [drop(r) for r in lb]  # same epoch losses, incl. the epoch cut in two


# --- perceptual fine-tuning -------------------------------------------------------------------------------------


def test_finetune_qkv_changes_only_qkv(nights, stage1, tmp_path):
    base_dir, _ = stage1
    base_path, out = os.path.join(base_dir, "nights.pt"), str(tmp_path / "ft")
    result = finetune_qkv.main(["--checkpoint", base_path, "--data", nights, "--out", out,
                                "--epochs", "1", "--workers", "0", "--lr", "1e-3", "--no-augment"])
    base, tuned = load_checkpoint(base_path), load_checkpoint(os.path.join(out, "finetuned.pt"))
    assert tuned.keys() == base.keys()
    changed = [k for k in base if not tensors_equal(base[k], tuned[k])]
    assert changed and all(finetune_qkv.is_qkv(k) for k in changed)
    assert {k.rsplit(".", 1)[-1] for k in changed} == {"in_proj_weight", "in_proj_bias"}
    assert "val_2afc" in result["last"]


def test_finetune_lora_merges_into_plain_weights(nights, stage1, tmp_path):
    base_dir, _ = stage1
    base_path, out = os.path.join(base_dir, "nights.pt"), str(tmp_path / "lora")
    r, alpha = 4, 0.5
    finetune_qkv.main(["--checkpoint", base_path, "--data", nights, "--out", out, "--epochs", "1",
                       "--workers", "0", "--lr", "1e-2", "--no-augment", "--lora", str(r), "--lora-alpha", str(alpha),
                       "--final", "last"])
    base, merged = load_checkpoint(base_path), load_checkpoint(os.path.join(out, "finetuned.pt"))
    state = load_checkpoint(os.path.join(out, "state.pt"))["model"]
    assert merged.keys() == base.keys()
    CLIP(CLIPConfig.tiny()).load_state_dict(merged, strict=True)
    n_blocks = CLIPConfig.tiny().vision_layers
    for i in range(n_blocks):
        key = f"visual.transformer.resblocks.{i}.attn.in_proj_weight"
        prefix = f"visual.transformer.resblocks.{i}.attn.parametrizations.in_proj_weight."
        A, B, W = state[prefix + "0.lora_A"], state[prefix + "0.lora_B"], state[prefix + "original"]
        assert A.shape == (r, W.shape[1]) and B.shape == (W.shape[0], r)
        assert tensors_equal(W, base[key])  # the base weight itself is frozen
        assert B.abs().sum() > 0
        torch.testing.assert_close(merged[key], base[key] + alpha / r * B @ A, rtol=0, atol=1e-6)
    others = [k for k in base if not k.endswith("attn.in_proj_weight") or not k.startswith("visual.")]
    assert all(tensors_equal(base[k], merged[k]) for k in others)


def test_finetune_wrong_architecture_stops_early(nights, stage1, tmp_path):
    base_dir, _ = stage1
    wrong = str(tmp_path / "wrong.pt")
    sd = load_checkpoint(os.path.join(base_dir, "nights.pt"))
    sd.pop("visual.proj")
    torch.save(sd, wrong)
    out = str(tmp_path / "ft")
    with pytest.raises(CheckpointError, match=r"(?s)wrong\.pt.*missing keys: visual\.proj"):
        finetune_qkv.main(["--checkpoint", wrong, "--model", "tiny", "--data", nights, "--out", out])
    config = tmp_path / "wide.json"  # the same weights read as a CLIP with a wider vision tower
    config.write_text(json.dumps(dataclasses.asdict(CLIPConfig.tiny(vision_width=96))))
    with pytest.raises(CheckpointError, match=r"(?s)nights\.pt.*mis-shaped keys: visual\.class_embedding"):
        finetune_qkv.main(["--checkpoint", os.path.join(base_dir, "nights.pt"), "--config", str(config),
                           "--data", nights, "--out", out])
    assert not os.path.exists(out)


# --- DDP --------------------------------------------------------------------------------------------------------


def test_torchrun_two_processes_match_one(nights, tmp_path):
    # two CPU processes (gloo) with half the batch each take the same steps as one process with the whole batch
    args = ["--data", nights, "--epochs", "1", "--subset", "0.5", "--no-augment"] + TINY
    one = str(tmp_path / "one")
    train_nights.main(args + ["--out", one])
    two = str(tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_nights.py")] + args + ["--out", two]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_checkpoint(os.path.join(one, "nights.pt")), load_checkpoint(os.path.join(two, "nights.pt"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    la = json.loads(open(os.path.join(one, "log.jsonl")).readlines()[-1])
    lb = json.loads(open(os.path.join(two, "log.jsonl")).readlines()[-1])
    assert la["val_n"] == lb["val_n"] == COUNTS["val"]
    assert la["val_2afc"] == pytest.approx(lb["val_2afc"], abs=100 / COUNTS["val"] + 1e-7)


# --- data.csv edge cases and the one triplet encoding ------------------------------------------------------------


def _append_rows(root, rows):
    import csv
    with open(os.path.join(root, "data.csv"), newline="", encoding="utf-8") as f:
        fields = csv.DictReader(f).fieldnames
    with open(os.path.join(root, "data.csv"), "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=fields).writerows(rows)


def test_empty_votes_cell_is_dropped_and_counted(nights, tmp_path):
    root = str(tmp_path / "n")
    shutil.copytree(nights, root)
    # DreamSim's loader keeps data.csv[votes >= 6]: a NaN (empty) cell compares False, so the row is dropped
    _append_rows(root, [{"id": 900 + i, "votes": "", "right_vote": "1.0", "left_vote": "0.0", "split": "train",
                         "ref_path": "ref/none.png", "left_path": "distort/none_0.png",
                         "right_path": "distort/none_1.png", "is_imagenet": "True"} for i in range(2)])
    dropped = {}
    assert len(read_nights_csv(root, "train", dropped=dropped)) == COUNTS["train"] and dropped == {"no_votes": 2}
    with pytest.warns(UserWarning, match="2 row.*empty votes cell"):
        ds = NightsTriplets(root, "train")
    assert len(ds) == COUNTS["train"] and ds.dropped == {"no_votes": 2}
    _append_rows(root, [{"id": 999, "votes": "six", "split": "train"}])
    with pytest.raises(ValueError, match=r"data\.csv, line 1\d\d: votes is 'six'"):
        read_nights_csv(root, "train")


def test_data_csv_is_read_as_utf8_whatever_the_locale(nights, tmp_path):
    root = str(tmp_path / "n")
    shutil.copytree(nights, root)
    _append_rows(root, [{"id": 950, "votes": "2", "split": "train", "prompt": "un café à Zürich ☕"}])
    # C locale without UTF-8 coercion: open() without an encoding would decode as ASCII and fail on the prompt
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    code = f"import data; print(len(data.read_nights_csv({root!r}, 'train')))"
    proc = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(COUNTS["train"])


def test_stage1_validation_and_reported_2afc_are_one_computation(nights, monkeypatch):
    import evaluate
    import model as model_lib
    torch.manual_seed(0)
    net = CLIP(CLIPConfig.tiny()).eval()
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return model_lib.triplet_distances(*args, **kwargs)

    monkeypatch.setattr(train_nights, "triplet_distances", counted)
    monkeypatch.setattr(evaluate, "triplet_distances", counted)
    val = NightsTriplets(nights, "val", image_size=net.config.image_size)
    ours = train_nights.evaluate(net, torch.utils.data.DataLoader(val, batch_size=5), torch.device("cpu"), "fp32")
    reported = evaluate.nights_eval(net, nights, batch_size=7, workers=0)
    assert len(calls) == 4  # train_nights.evaluate once, nights_eval once per split
    assert reported["val"]["n"] == ours["val_n"] == COUNTS["val"]
    assert reported["val"]["2afc"] == pytest.approx(ours["val_2afc"], abs=1e-4)  # one unit; float32 vs float64
    # and both equal the 2AFC of eq. 1's distances computed image by image
    with torch.no_grad():
        feats = [net.encode_image(torch.stack([val[i][k] for i in range(len(val))])) for k in range(3)]
    labels = torch.stack([val[i][3] for i in range(len(val))])
    from model import two_afc_accuracy
    assert ours["val_2afc"] == pytest.approx(100 * float(two_afc_accuracy(*feats, labels)), abs=1e-4)


def test_lora_recipe_is_dreamsims_training_code(nights, stage1, tmp_path):
    # DreamSim: training/train.py (Adam betas (0.5, 0.999), resize-only data) + configs/train_single_model_lora.yaml
    args = finetune_qkv.resolve_recipe(finetune_qkv.get_parser().parse_args(
        ["--checkpoint", "x.pt", "--data", nights, "--out", "o", "--lora", "16"]))
    assert (args.lr, args.weight_decay, args.batch_size, args.epochs, args.margin) == (3e-4, 0.0, 32, 8, 0.05)
    assert (args.lora, args.lora_alpha, args.lora_dropout) == (16, 32.0, 0.2)
    assert (args.beta1, args.beta2, args.eps) == (0.5, 0.999, 1e-8) and args.no_augment and args.final == "best"
    plain = finetune_qkv.resolve_recipe(finetune_qkv.get_parser().parse_args(
        ["--checkpoint", "x.pt", "--data", nights, "--out", "o", "--beta1", "0.8", "--beta2", "0.9"]))
    assert (plain.beta1, plain.beta2) == (0.8, 0.9) and not plain.no_augment and plain.batch_size == 16  # overrides
    # the optimiser a --lora run actually uses
    base_path, out = os.path.join(stage1[0], "nights.pt"), str(tmp_path / "lora")
    finetune_qkv.main(["--checkpoint", base_path, "--data", nights, "--out", out, "--epochs", "1", "--workers", "0",
                       "--lora", "4", "--subset", "0.5"])
    groups = load_checkpoint(os.path.join(out, "state.pt"))["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.5, 0.999) and g["eps"] == 1e-8 and g["lr"] == 3e-4 for g in groups)


def test_lora_dropout_acts_on_the_branch_input_as_peft():
    torch.manual_seed(0)
    net = CLIP(CLIPConfig.tiny())
    finetune_qkv.add_lora(net, r=4, alpha=8.0, dropout=0.5)
    attn = net.visual.transformer.resblocks[0].attn
    lora = attn.parametrizations.in_proj_weight[0]
    torch.nn.init.normal_(lora.lora_B)  # B starts at zero; make the branch visible
    W, b = attn.parametrizations.in_proj_weight.original, attn.in_proj_bias
    x = torch.randn(2, 5, W.shape[1])
    plain = torch.nn.MultiheadAttention(W.shape[1], attn.heads, batch_first=True)  # the reference attention
    plain.out_proj.load_state_dict(attn.out_proj.state_dict())
    with torch.no_grad():
        attn.eval()  # eval: the merged weight W + s·B·A, no dropout
        plain.in_proj_weight.copy_(W + 2.0 * lora.lora_B @ lora.lora_A)
        plain.in_proj_bias.copy_(b)
        torch.testing.assert_close(attn(x), plain(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)
        attn.train()  # training: W x + b + s·B·A·dropout(x), with PEFT's dropout mask drawn on x
        torch.manual_seed(5)
        out = attn(x)
        torch.manual_seed(5)
        dropped = torch.nn.functional.dropout(x, 0.5, training=True)
        qkv = x @ W.t() + b + 2.0 * dropped @ lora.lora_A.t() @ lora.lora_B.t()
        q, k, v = (t.view(2, 5, attn.heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        heads = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        want = attn.out_proj(heads.transpose(1, 2).reshape(2, 5, -1))
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
