"""The whole PI experiment, end to end, on a laptop CPU, with no download.

    python demo.py                # ~5-10 minutes on 2 CPU cores; everything lands in demo_out/
    python demo.py --quick        # a smaller run of the same pipeline, well under a minute (what the tests run)

It builds the synthetic world of synthetic_world.py (coloured shapes, written as a NIGHTS folder, tar shards,
ImageFolder tasks and a Karpathy retrieval JSON: the real formats, so every real code path runs), learns a BPE
merges file from its captions, and then runs the paper's experiment with the tiny model, printing each command:

    stage 1   train_nights.py                 -> nights/nights.pt        (PI paper §3.1)
    stage 2   train_clip.py --init nights.pt  -> pi/                     (PI, §3.2)
              train_clip.py                   -> baseline/               (the baseline, §3.3; same seed and budget)
    later     finetune_qkv.py baseline        -> qkv/                    (human-later fine-tuning, §3.3)
    evaluate  evaluate.py --compare           -> eval_pi_vs_baseline/, eval_qkv_vs_baseline/

The toy world tests the machinery, not the paper's claim: read its numbers as such.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

from data import learn_bpe
from synthetic_world import make_synthetic_world

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ("nights", "pi", "baseline", "qkv", "eval_pi_vs_baseline", "eval_qkv_vs_baseline")  # what demo.py writes

# world size, stage-1 epochs, stage-2 epochs, stage-2 global batch, fine-tuning epochs
SIZES = {
    "full": dict(world=dict(n_pairs=6000, n_triplets=2000, n_test_per_class=40, n_retrieval=200),
                 nights_epochs=8, clip_epochs=16, clip_batch=256, qkv_epochs=2, merges=1000),
    "quick": dict(world=dict(n_pairs=512, n_triplets=200, n_test_per_class=4, n_retrieval=20, samples_per_shard=256),
                  nights_epochs=1, clip_epochs=1, clip_batch=128, qkv_epochs=1, merges=200),
}


def run(script, *args):
    cmd = [sys.executable, os.path.join(HERE, script), *map(str, args)]
    print("\n$ python " + " ".join(shlex.quote(str(a)) for a in [script, *args]), flush=True)
    subprocess.run(cmd, check=True)


def captions(shards):
    """Every caption in the tar shards (the {key}.txt members), to learn the BPE merges from."""
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="the smaller run the tests use")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    out = os.path.abspath(args.out)
    t0 = time.time()

    for run_dir in RUNS:  # a re-run starts afresh (the training scripts refuse to overwrite a run without --resume)
        shutil.rmtree(os.path.join(out, run_dir), ignore_errors=True)
    world = make_synthetic_world(os.path.join(out, "world"), seed=args.seed, image_size=64, **size["world"])
    merges = os.path.join(out, "bpe_merges.txt.gz")
    learn_bpe(captions(world.shards), merges, num_merges=size["merges"])
    common = ["--model", "tiny", "--seed", args.seed, "--workers", 0]

    # Stage 1: the vision tower learns the (synthetic) human judgements
    run("train_nights.py", "--data", world.nights, "--out", f"{out}/nights", "--epochs", size["nights_epochs"],
        "--batch-size", 64, "--lr", 1e-3, "--warmup-epochs", 0.5, *common)
    # Stage 2: PI and baseline differ only in --init
    # Two departures from the paper's stage-2 defaults, for the toy scale only: CLIP's initial temperature (1/0.07)
    # instead of the paper's ln(100) start, which leaves a 166k-parameter model flat for its first ~300 steps of a
    # ~370-step budget; and no augmentation, since the toy captions name colours and positions that colour jitter,
    # grayscale and flips would falsify. Stage 1 keeps its augmentations (drawn once per triplet).
    stage2 = ["--train-data", world.shard_pattern, "--merges", merges, "--epochs", size["clip_epochs"],
              "--batch-size", size["clip_batch"], "--lr", 2e-3, "--warmup", 20, "--save-every", 100,
              "--logit-scale-init", 14.29, "--no-augment", *common]
    run("train_clip.py", *stage2, "--out", f"{out}/pi", "--init", f"{out}/nights/nights.pt")
    run("train_clip.py", *stage2, "--out", f"{out}/baseline")
    final = f"epoch_{size['clip_epochs']}.pt"
    # Human-later: the baseline's QKV projections fine-tuned on the triplets
    run("finetune_qkv.py", "--data", world.nights, "--checkpoint", f"{out}/baseline/{final}", "--out", f"{out}/qkv",
        "--epochs", size["qkv_epochs"], *common)

    evaluation = ["--merges", merges, "--synthetic", world.root, "--datasets", "", "--retrieval", "",
                  "--workers", 0]
    run("evaluate.py", "--checkpoint", f"{out}/pi/{final}", "--compare", f"{out}/baseline/{final}",
        "--out", f"{out}/eval_pi_vs_baseline", *evaluation)
    run("evaluate.py", "--checkpoint", f"{out}/qkv/finetuned.pt", "--compare", f"{out}/baseline/{final}",
        "--config-json", f"{out}/baseline/config.json", "--out", f"{out}/eval_qkv_vs_baseline", *evaluation)

    # NIGHTS 2AFC of all three models, side by side
    pi = json.load(open(f"{out}/eval_pi_vs_baseline/results.json"))
    qkv = json.load(open(f"{out}/eval_qkv_vs_baseline/results.json"))
    splits = ("val", "test_imagenet", "test_no_imagenet")
    print("\nNIGHTS-style 2AFC on the synthetic triplets (%):")
    print("| model | " + " | ".join(splits) + " |\n|---|---|---|---|")
    for name, res in (("baseline", pi["base"]), ("PI", pi["ours"]), ("human-later (QKV)", qkv["ours"])):
        print(f"| {name} | " + " | ".join(f"{res['nights'][s]['2afc']:.1f}" for s in splits) + " |")
    print(f"\ndemo finished in {time.time() - t0:.0f} s; reports: {out}/eval_*/report.md")


if __name__ == "__main__":
    main()
