"""The whole PI experiment, end to end, on a laptop CPU, with no download.

    python demo.py                  # one seed, about 8 minutes on 2 CPU cores; everything lands in demo_out/
    python demo.py --seeds 0,1,2    # the experiment per seed, then mean ± sd and paired 95% intervals: summary.md
    python demo.py --quick          # a smaller run of the same pipeline, well under a minute (what the tests run)

Per seed it builds the synthetic world of synthetic_world.py (coloured shapes, written as a NIGHTS folder, tar
shards, ImageFolder tasks and a Karpathy retrieval JSON: the real formats, so every real code path runs), learns a
BPE merges file from its captions, and runs the paper's experiment with the tiny model, printing each command
(steps that do not need each other's output run side by side, one core each, their output in seed_<s>/<step>.out):

    stage 1   train_nights.py                 -> seed_<s>/nights/nights.pt   (PI paper §3.1)
    stage 2   train_clip.py --init nights.pt  -> seed_<s>/pi/                (PI, §3.2)
              train_clip.py                   -> seed_<s>/baseline/          (the baseline, §3.3; same seed, budget)
    later     finetune_qkv.py baseline        -> seed_<s>/qkv/               (human-later fine-tuning, §3.3)
    evaluate  evaluate.py --compare           -> seed_<s>/eval_pi_vs_baseline/, eval_qkv_vs_baseline/
    figures   evaluate.py --scaling pi,baseline, plots.py curves -> seed_<s>/figures/ (Figures 3-4, training curves)

and finally writes summary.md: per benchmark the mean ± sd over seeds of PI, baseline and human-later, the paired
PI - baseline difference with its 95% t-interval, and the paper's win count, counting only the differences whose
interval excludes 0. The toy world tests the machinery, not the paper's claim: read its numbers as such.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np

from data import learn_bpe
from synthetic_world import make_synthetic_world

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ("world", "nights", "pi", "baseline", "qkv", "eval_pi_vs_baseline", "eval_qkv_vs_baseline", "figures")

# world size, stage-1 epochs, stage-2 epochs, stage-2 global batch, fine-tuning epochs, BPE merges. "full" is sized
# for one seed in under 10 minutes on 2 CPU cores: stage 1 plateaus within its 4 epochs, and each stage-2 run takes
# 2,340 steps (300k pairs), which the tiny model needs before shape emerges (at 1,170 steps it was near chance).
SIZES = {
    "full": dict(world=dict(n_pairs=30000, n_triplets=2000, n_test_per_class=40, n_retrieval=200),
                 nights_epochs=4, clip_epochs=10, clip_batch=128, qkv_epochs=2, merges=1000),
    "quick": dict(world=dict(n_pairs=512, n_triplets=200, n_test_per_class=4, n_retrieval=20, samples_per_shard=512),
                  nights_epochs=1, clip_epochs=2, clip_batch=128, qkv_epochs=1, merges=200),
}
MODEL = "tiny"  # the CLIPConfig preset every stage uses
IMAGE_SIZE = 32  # the world is rendered at the model's input size: no resampling between the two


def command(script, *args):
    """The argv that runs one of this repo's scripts, and the line that shows it."""
    return [sys.executable, os.path.join(HERE, script), *map(str, args)], \
        "$ python " + " ".join(shlex.quote(str(a)) for a in [script, *args])


def run(script, *args):
    cmd, shown = command(script, *args)
    print("\n" + shown, flush=True)
    t = time.time()
    subprocess.run(cmd, check=True)
    print(f"({script}: {time.time() - t:.0f} s)", flush=True)


def run_side_by_side(jobs):
    """Run several of this repo's scripts at once, each with an equal share of the CPU cores and its output in its
    own file; jobs is [(log path, script, *args)]. Two small models side by side use two cores better than one
    after the other: a model this small keeps only about 1.5 cores busy."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # the user's setting wins
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(jobs)))
    t, procs = time.time(), []
    for log, script, *args in jobs:
        cmd, shown = command(script, *args)
        print(f"\n{shown}\n  (side by side; output in {log})", flush=True)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f:
            procs.append((log, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)))
    failed = [(log, p.args) for log, p in procs if p.wait() != 0]
    for log, _ in failed:
        with open(log) as f:
            print(f"\n--- end of {log} ---\n" + "".join(f.readlines()[-20:]), file=sys.stderr)
    if failed:
        raise subprocess.CalledProcessError(1, failed[0][1])
    print(f"({len(jobs)} runs side by side: {time.time() - t:.0f} s)", flush=True)


def captions(shards):
    """Every caption in the tar shards (the {key}.txt members), to learn the BPE merges from."""
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    return out


def experiment(out, seed, size):
    """One seed of the experiment under `out`; returns {model: {benchmark: value}} for PI, baseline, human-later."""
    for run_dir in RUNS:  # a re-run starts afresh (the training scripts refuse to overwrite a run without --resume)
        shutil.rmtree(os.path.join(out, run_dir), ignore_errors=True)
    t = time.time()
    world = make_synthetic_world(os.path.join(out, "world"), seed=seed, image_size=IMAGE_SIZE, **size["world"])
    merges = os.path.join(out, "bpe_merges.txt.gz")
    learn_bpe(captions(world.shards), merges, num_merges=size["merges"])
    print(f"world and BPE merges in {out}: {time.time() - t:.0f} s", flush=True)
    common = ["--model", MODEL, "--seed", seed, "--workers", 0]

    # Stage 1: the vision tower learns the (synthetic) human judgements
    run("train_nights.py", "--data", world.nights, "--out", f"{out}/nights", "--epochs", size["nights_epochs"],
        "--batch-size", 64, "--lr", 1e-3, "--warmup-epochs", 0.5, *common)
    # Stage 2: PI and baseline differ only in --init
    # Two departures from the paper's stage-2 defaults, for the toy scale only: CLIP's initial temperature (1/0.07)
    # instead of the paper's ln(100) start, which leaves a model this small flat for most of its short budget; and
    # no augmentation, since the toy captions name colours, which colour jitter and grayscale falsify, and counts,
    # which a crop can change. Stage 1 keeps its augmentations (drawn once per triplet). The two runs go side by
    # side, one core each.
    stage2 = ["--data", world.shard_pattern, "--merges", merges, "--epochs", size["clip_epochs"],
              "--batch-size", size["clip_batch"], "--lr", 2e-3, "--warmup-steps", 20, "--save-every-steps", 100,
              "--logit-scale-init", 14.29, "--no-augment", *common]
    run_side_by_side([(f"{out}/pi.out", "train_clip.py", *stage2, "--out", f"{out}/pi",
                       "--init", f"{out}/nights/nights.pt"),
                      (f"{out}/baseline.out", "train_clip.py", *stage2, "--out", f"{out}/baseline")])
    final = f"epoch_{size['clip_epochs']}.pt"
    evaluation = ["--merges", merges, "--synthetic", world.root, "--datasets", "", "--retrieval", "",
                  "--workers", 0]
    # Then, side by side (none needs another's output): human-later, the baseline's QKV projections fine-tuned on
    # the triplets; PI vs baseline on every benchmark; and the figures, zero-shot accuracy of every epoch's
    # checkpoint against samples seen, and the training curves
    run_side_by_side([
        (f"{out}/qkv.out", "finetune_qkv.py", "--data", world.nights, "--checkpoint", f"{out}/baseline/{final}",
         "--out", f"{out}/qkv", "--epochs", size["qkv_epochs"], *common),
        (f"{out}/eval_pi_vs_baseline.out", "evaluate.py", "--checkpoint", f"{out}/pi/{final}",
         "--compare", f"{out}/baseline/{final}", "--out", f"{out}/eval_pi_vs_baseline", *evaluation),
        (f"{out}/figures.out", "evaluate.py", "--scaling", f"{out}/pi,{out}/baseline",
         "--samples-per-epoch", world.counts["n_pairs"], "--out", f"{out}/figures", *evaluation),
        (f"{out}/curves.out", "plots.py", "curves", f"{out}/pi/log.jsonl", f"{out}/baseline/log.jsonl",
         "--labels", "PI,baseline", "--out", f"{out}/figures/curves.png")])
    run("evaluate.py", "--checkpoint", f"{out}/qkv/finetuned.pt", "--compare", f"{out}/baseline/{final}",
        "--config", f"{out}/baseline/config.json", "--out", f"{out}/eval_qkv_vs_baseline", *evaluation)

    with open(f"{out}/eval_pi_vs_baseline/results.json") as f:
        pi = json.load(f)
    with open(f"{out}/eval_qkv_vs_baseline/results.json") as f:
        qkv = json.load(f)
    return {"PI": benchmarks(pi["ours"]), "baseline": benchmarks(pi["base"]), "human-later": benchmarks(qkv["ours"])}


# ---- the summary over seeds ----

IMAGE_TEXT = ("zero-shot", "retrieval")  # the benchmarks the paper's win count is over (Table 1-2 kind)


def benchmarks(res):
    """{(kind, name): value in %} from one model's evaluate.py results: zero-shot top-1 per synthetic task,
    retrieval recalls, and NIGHTS 2AFC per split."""
    out = {}
    syn = res.get("synthetic") or {}
    for task, r in (syn.get("zeroshot") or {}).items():
        if r.get("top1") is not None:
            out[f"zero-shot {task} top1"] = r["top1"]
    for k, v in (syn.get("retrieval") or {}).items():
        if k.startswith(("i2t_r", "t2i_r")):
            out[f"retrieval {k}"] = v
    for split, r in (res.get("nights") or {}).items():
        if r.get("2afc") is not None:
            out[f"NIGHTS 2AFC {split}"] = r["2afc"]
    return out


def student_t_cdf(x, df, panels=2000):
    """P(T <= x) for Student's t with `df` degrees of freedom: 1/2 plus the density integrated from 0 to x by
    Simpson's rule (the density is smooth and unimodal, so 2000 panels give ~1e-10 for the quantiles we need)."""
    t = np.linspace(0.0, abs(x), panels + 1)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
    weights = np.where(np.arange(panels + 1) % 2, 4.0, 2.0)
    weights[0] = weights[-1] = 1.0
    return 0.5 + math.copysign(float(weights @ density) * (t[1] - t[0]) / 3, x)


def student_t_quantile(p, df):
    """The x with P(T <= x) = p, by bisection on student_t_cdf (scipy.stats.t.ppf without scipy)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"need 0 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = -1.0, 1.0
    while student_t_cdf(lo, df) > p:
        lo *= 2
    while student_t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_sd(values):
    """Mean and sample standard deviation (n - 1); sd is None for a single value."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return m, sd


def paired_interval(ours, base, level=0.95):
    """Mean of the paired differences ours - base over seeds and its t-interval: (mean, low, high); the bounds are
    None with fewer than two seeds."""
    d = [o - b for o, b in zip(ours, base)]
    m, sd = mean_sd(d)
    if sd is None:
        return m, None, None
    half = student_t_quantile(0.5 + level / 2, len(d) - 1) * sd / math.sqrt(len(d))
    return m, m - half, m + half


def summary_markdown(per_seed, seeds, wall_s=None):
    """summary.md from {seed: {model: {benchmark: value}}}: mean ± sd per model, the paired PI - baseline
    difference with its 95% interval, and the win count over the image-text benchmarks, where a win (loss) is a
    difference whose whole interval lies above (below) 0 and everything else is too close to call."""
    fmt = lambda m, sd: f"{m:.1f}" if sd is None else f"{m:.1f} ± {sd:.1f}"  # noqa: E731
    models = ("PI", "baseline", "human-later")
    names = [b for b in per_seed[seeds[0]]["PI"] if all(b in per_seed[s][m] for s in seeds for m in models)]
    lines = [f"# PI vs baseline on the synthetic world: {len(seeds)} seed(s) ({', '.join(map(str, seeds))})", "",
             "Percentages: mean ± sd over seeds; Δ = PI − baseline, paired by seed, with its 95% t-interval.", "",
             "| benchmark | PI | baseline | human-later | Δ PI − baseline | 95% interval |",
             "|---|---:|---:|---:|---:|---|"]
    count = {"win": 0, "loss": 0, "open": 0}
    for b in names:
        vals = {m: [per_seed[s][m][b] for s in seeds] for m in models}
        d, lo, hi = paired_interval(vals["PI"], vals["baseline"])
        interval = "—" if lo is None else f"[{lo:+.1f}, {hi:+.1f}]"
        lines.append(f"| {b} | " + " | ".join(fmt(*mean_sd(vals[m])) for m in models) + f" | {d:+.1f} | {interval} |")
        if b.startswith(IMAGE_TEXT):
            count["win" if lo is not None and lo > 0 else "loss" if hi is not None and hi < 0 else "open"] += 1
    total = sum(count.values())
    lines += ["", f"Paper-style count over the {total} image-text benchmarks (zero-shot and retrieval), counting only "
                  f"differences whose 95% interval excludes 0: PI better on {count['win']}, worse on "
                  f"{count['loss']}, too close to call on {count['open']}."]
    if wall_s is not None:
        lines += ["", f"Wall time: {wall_s:.0f} s for {len(seeds)} seed(s)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="the smaller run the tests use")
    p.add_argument("--seeds", default=None, help="comma list of seeds, one experiment each (default: 0)")
    p.add_argument("--seed", type=int, default=None, help="a single seed (the same as --seeds N)")
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: rebuild summary.md from <out>/seed_<s>/benchmarks.json of the given seeds "
                        "(e.g. after running one job per seed)")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seed is not None:
        p.error("give --seeds or --seed, not both")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed or 0]
    except ValueError:
        p.error(f"--seeds wants integers separated by commas, got '{args.seeds}'")
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    size = SIZES["quick" if args.quick else "full"]
    out = os.path.abspath(args.out)
    t0 = time.time()
    per_seed = {}
    for seed in seeds:
        path = os.path.join(out, f"seed_{seed}", "benchmarks.json")
        if args.summary_only:
            if not os.path.isfile(path):
                p.error(f"--summary-only: {path} not found (run that seed first)")
            with open(path) as f:
                per_seed[seed] = json.load(f)
            continue
        per_seed[seed] = experiment(os.path.join(out, f"seed_{seed}"), seed, size)
        with open(path, "w") as f:  # kept if a later seed fails
            json.dump(per_seed[seed], f, indent=1)
        print(f"\nseed {seed} done after {time.time() - t0:.0f} s", flush=True)
    md = summary_markdown(per_seed, seeds, wall_s=None if args.summary_only else time.time() - t0)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    print(f"summary: {out}/summary.md; per seed: {out}/seed_<s>/eval_*/report.md and figures/")


if __name__ == "__main__":
    main()
