"""The whole PI experiment, end to end, on a laptop CPU, with no download.

    python demo.py                  # one seed, about 8 minutes on 2 idle CPU cores; everything lands in demo_out/
    python demo.py --seeds 0,1,2    # the experiment per seed, then mean ± sd and paired 95% intervals: summary.md
    python demo.py --quick          # a smaller run of the same pipeline, about a minute, in demo_out_quick/

Per seed it builds the synthetic world of synthetic_world.py (coloured shapes, written as a NIGHTS folder, tar
shards, ImageFolder tasks and a Karpathy retrieval JSON: the real formats, so every real code path runs), learns a
BPE merges file from its captions, and runs the paper's experiment with the tiny model, printing each command
(steps that do not need each other's output run side by side, their output in seed_<s>/<step>.out, with a line
per epoch from each printed here):

    stage 1   train_nights.py                 -> seed_<s>/nights/nights.pt   (PI paper §3.1)
    stage 2   train_clip.py --init nights.pt  -> seed_<s>/pi/                (PI, §3.2)
              train_clip.py                   -> seed_<s>/baseline/          (the baseline, §3.3; same seed, budget)
    later     finetune_qkv.py baseline        -> seed_<s>/qkv/               (human-later fine-tuning, §3.3)
    evaluate  evaluate.py --compare           -> seed_<s>/eval_pi_vs_baseline/, eval_qkv_vs_baseline/
    figures   evaluate.py --scaling pi,baseline, plots.py curves -> seed_<s>/figures/ (Figures 3-4, training curves)

and finally writes summary.md: the sizes each seed ran at, and per benchmark the mean ± sd over seeds of PI,
baseline and human-later, the paired PI - baseline difference with its 95% t-interval (two seeds at least), and the
paper's win count, counting only the differences whose interval excludes 0. The toy world tests the machinery, not
the paper's claim: read its numbers as such.

A seed folder that already holds a run is never replaced without --overwrite, and --quick has its own --out, so a
quick run cannot touch a full one. Every step runs with --threads torch threads (1: a model this small gains little
from more, and a thread pool larger than the cores left free slows a step several-fold on a shared machine).
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
# what experiment() writes into seed_<s>/: --overwrite removes exactly these
RUNS = ("world", "nights", "pi", "baseline", "qkv", "eval_pi_vs_baseline", "eval_qkv_vs_baseline", "figures")
FILES = ("bpe_merges.txt.gz", "benchmarks.json", "pi.out", "baseline.out", "qkv.out", "eval_pi_vs_baseline.out",
         "figures.out", "curves.out")

# world size, stage-1 epochs, stage-2 epochs, stage-2 global batch, fine-tuning epochs, BPE merges. "full" is sized
# for one seed in under 10 minutes on 2 CPU cores: stage 1 plateaus within its 4 epochs, and each stage-2 run takes
# 2,340 steps (300k pairs), which the tiny model needs before shape emerges (at 1,170 steps it was near chance).
SIZES = {
    "full": dict(world=dict(n_pairs=30000, n_triplets=2000, n_test_per_class=40, n_retrieval=200),
                 nights_epochs=4, clip_epochs=10, clip_batch=128, qkv_epochs=2, merges=1000),
    "quick": dict(world=dict(n_pairs=512, n_triplets=200, n_test_per_class=4, n_retrieval=20, samples_per_shard=512),
                  nights_epochs=1, clip_epochs=2, clip_batch=128, qkv_epochs=1, merges=200),
}
OUT = {"full": "demo_out", "quick": "demo_out_quick"}  # the default --out of each mode
MODEL = "tiny"  # the CLIPConfig preset every stage uses
IMAGE_SIZE = 32  # the world is rendered at the model's input size: no resampling between the two


def available_cores():
    """The cores this process may run on (its affinity mask: fewer than os.cpu_count() in a container or job)."""
    return len(os.sched_getaffinity(0))


def default_workers(threads, side_by_side):
    """DataLoader workers per step: the cores the steps running at once leave after their torch threads, shared
    among them, at most 4 (the demo's 32-px PNGs decode fast). The results do not depend on it."""
    return max(0, min(4, available_cores() // side_by_side - threads))


def command(script, *args):
    """The argv that runs one of this repo's scripts, and the line that shows it."""
    return [sys.executable, os.path.join(HERE, script), *map(str, args)], \
        "$ python " + " ".join(shlex.quote(str(a)) for a in [script, *args])


def step_env(threads):
    """The environment of every step: its torch thread pool set explicitly (torch reads OMP_NUM_THREADS when it
    starts; its default, one thread per core, thrashes when other work holds some of the cores)."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def run(script, *args, threads):
    """One step, its output shown as it comes."""
    cmd, shown = command(script, *args)
    print("\n" + shown, flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, env=step_env(threads))
    print(f"({script}: {time.time() - t:.0f} s)", flush=True)


class Follow:
    """The epoch lines a side-by-side step appends to its log.jsonl, read as they come: a line without "loss" is an
    epoch's (train_clip.py writes one per step with "loss" between them; train_nights.py and finetune_qkv.py one per
    epoch, epoch 0 being the start)."""

    def __init__(self, name, log, epochs):
        self.name, self.log, self.epochs, self.offset, self.loss, self.t0 = name, log, epochs, 0, None, time.time()

    def new_lines(self):
        if self.log is None or not os.path.isfile(self.log):
            return []
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            text = f.read()
        text = text[: text.rfind(b"\n") + 1]  # a half-written last line waits for the next look
        self.offset += len(text)
        lines = []
        for line in text.decode().splitlines():
            record = json.loads(line)
            if "loss" in record:
                self.loss = record["loss"]
            elif record.get("epoch", 0) > 0:
                lines.append(self.describe(record))
        return lines

    def describe(self, r):
        parts = [f"  [{self.name}] epoch {r['epoch']}/{self.epochs}, step {r.get('step')}"]
        loss = r.get("train_loss") if r.get("train_loss") is not None else self.loss  # stage 1's, or the last step's
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        if r.get("val_2afc") is not None:  # a fraction or a percent, whichever the script logs: chance is 50%
            parts.append(f"val 2AFC {r['val_2afc'] * (100 if r['val_2afc'] <= 1 else 1):.1f}%")
        return ", ".join(parts) + f" ({time.time() - self.t0:.0f} s)"


def run_side_by_side(steps, threads, poll_s=2.0):
    """Run several of this repo's scripts at once, each with `threads` torch threads and its output in its own file,
    printing a line per epoch from each and one when each ends. steps: [(name, out file, log.jsonl to follow or
    None, epochs, script, *args)]. Two small models side by side use two cores better than one after the other."""
    t, procs = time.time(), []
    for name, out_file, log, epochs, script, *args in steps:
        cmd, shown = command(script, *args)
        print(f"\n{shown}\n  [{name}] side by side; output in {out_file}", flush=True)
        os.makedirs(os.path.dirname(out_file), exist_ok=True)
        with open(out_file, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=step_env(threads))
        procs.append((Follow(name, log, epochs), out_file, proc))
    running = list(procs)
    while running:
        time.sleep(poll_s)
        for step in list(running):
            follow, proc = step[0], step[2]
            finished = proc.poll() is not None  # before reading, so that its last lines are not missed
            for line in follow.new_lines():
                print(line, flush=True)
            if finished:
                print(f"  [{follow.name}] " + ("done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})")
                      + f" after {time.time() - t:.0f} s", flush=True)
                running.remove(step)
    failed = [(out_file, proc.args) for _, out_file, proc in procs if proc.returncode != 0]
    for out_file, _ in failed:
        with open(out_file) as f:
            print(f"\n--- end of {out_file} ---\n" + "".join(f.readlines()[-20:]), file=sys.stderr)
    if failed:
        raise subprocess.CalledProcessError(1, failed[0][1])
    print(f"({len(steps)} runs side by side: {time.time() - t:.0f} s)", flush=True)


def captions(shards):
    """Every caption in the tar shards (the {key}.txt members), to learn the BPE merges from."""
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    return out


def clear_seed(out):
    """Remove what an earlier experiment() wrote into `out` (only with --overwrite), and nothing else."""
    for name in RUNS:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in FILES:
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def experiment(out, seed, size, threads, workers=None):
    """One seed of the experiment under `out`; returns {model: {benchmark: value}} for PI, baseline, human-later.
    workers: DataLoader workers per step (default: default_workers for the steps that run at once)."""
    t = time.time()
    world = make_synthetic_world(os.path.join(out, "world"), seed=seed, image_size=IMAGE_SIZE, verbose=True,
                                 **size["world"])
    merges = os.path.join(out, "bpe_merges.txt.gz")
    learn_bpe(captions(world.shards), merges, num_merges=size["merges"])
    print(f"world and BPE merges in {out}: {time.time() - t:.0f} s", flush=True)
    common = ["--model", MODEL, "--seed", seed]
    alone, two, four = (default_workers(threads, n) if workers is None else workers for n in (1, 2, 4))

    # Stage 1: the vision tower learns the (synthetic) human judgements
    run("train_nights.py", "--data", world.nights, "--out", f"{out}/nights", "--epochs", size["nights_epochs"],
        "--batch-size", 64, "--lr", 1e-3, "--warmup-epochs", 0.5, *common, "--workers", alone, threads=threads)
    # Stage 2: PI and baseline differ only in --init
    # Two departures from the paper's stage-2 defaults, for the toy scale only: CLIP's initial temperature (1/0.07)
    # instead of the paper's ln(100) start, which leaves a model this small flat for most of its short budget; and
    # no augmentation, since the toy captions name colours, which colour jitter and grayscale falsify, and counts,
    # which a crop can change. Stage 1 keeps its augmentations (drawn once per triplet). The two runs go side by
    # side.
    epochs = size["clip_epochs"]
    stage2 = ["train_clip.py", "--data", world.shard_pattern, "--merges", merges, "--epochs", epochs,
              "--batch-size", size["clip_batch"], "--lr", 2e-3, "--warmup-steps", 20, "--save-every-steps", 100,
              "--logit-scale-init", 14.29, "--no-augment", *common, "--workers", two]
    run_side_by_side([("pi", f"{out}/pi.out", f"{out}/pi/log.jsonl", epochs, *stage2, "--out", f"{out}/pi",
                       "--init", f"{out}/nights/nights.pt"),
                      ("baseline", f"{out}/baseline.out", f"{out}/baseline/log.jsonl", epochs, *stage2,
                       "--out", f"{out}/baseline")], threads=threads)
    final = f"epoch_{epochs}.pt"
    evaluation = ["--merges", merges, "--synthetic", world.root, "--datasets", "", "--retrieval", ""]
    # Then, side by side (none needs another's output): human-later, the baseline's QKV projections fine-tuned on
    # the triplets; PI vs baseline on every benchmark; and the figures, zero-shot accuracy of every epoch's
    # checkpoint against samples seen, and the training curves
    run_side_by_side([
        ("qkv", f"{out}/qkv.out", f"{out}/qkv/log.jsonl", size["qkv_epochs"], "finetune_qkv.py",
         "--data", world.nights, "--checkpoint", f"{out}/baseline/{final}", "--out", f"{out}/qkv",
         "--epochs", size["qkv_epochs"], *common, "--workers", four),
        ("eval_pi_vs_baseline", f"{out}/eval_pi_vs_baseline.out", None, None, "evaluate.py",
         "--checkpoint", f"{out}/pi/{final}", "--compare", f"{out}/baseline/{final}",
         "--out", f"{out}/eval_pi_vs_baseline", *evaluation, "--workers", four),
        ("figures", f"{out}/figures.out", None, None, "evaluate.py", "--scaling", f"{out}/pi,{out}/baseline",
         "--samples-per-epoch", world.counts["n_pairs"], "--out", f"{out}/figures", *evaluation, "--workers", four),
        ("curves", f"{out}/curves.out", None, None, "plots.py", "curves", f"{out}/pi/log.jsonl",
         f"{out}/baseline/log.jsonl", f"{out}/nights/log.jsonl", "--labels", "PI,baseline,stage 1",
         "--out", f"{out}/figures/curves.png")], threads=threads)
    run("evaluate.py", "--checkpoint", f"{out}/qkv/finetuned.pt", "--compare", f"{out}/baseline/{final}",
        "--config", f"{out}/baseline/config.json", "--out", f"{out}/eval_qkv_vs_baseline", *evaluation,
        "--workers", alone, threads=threads)

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


def describe_sizes(mode, size):
    """One line naming a mode and its sizes, for summary.md."""
    if mode is None:
        return "Mode and sizes not recorded (each seed's benchmarks.json was written by an older demo.py)."
    w = size["world"]
    return (f"Mode: {mode}. World: {w['n_pairs']:,} image-caption pairs, {w['n_triplets']:,} triplets, "
            f"{w['n_test_per_class']} test images per zero-shot class, {w['n_retrieval']} retrieval images; "
            f"{size['merges']:,} BPE merges. Stage 1: {size['nights_epochs']} epoch(s); stage 2: "
            f"{size['clip_epochs']} epoch(s) at batch {size['clip_batch']}; human-later: {size['qkv_epochs']} "
            f"epoch(s).")


def summary_markdown(per_seed, seeds, mode, size, wall_s=None):
    """summary.md from {seed: {model: {benchmark: value}}} of seeds run in `mode` at `size` (SIZES[mode]): mean ± sd
    per model, the paired PI - baseline difference with its 95% interval, and the win count over the image-text
    benchmarks, where a win (loss) is a difference whose whole interval lies above (below) 0 and everything else is
    too close to call. One seed has no interval, so nothing is counted."""
    fmt = lambda m, sd: f"{m:.1f}" if sd is None else f"{m:.1f} ± {sd:.1f}"  # noqa: E731
    models = ("PI", "baseline", "human-later")
    names = [b for b in per_seed[seeds[0]]["PI"] if all(b in per_seed[s][m] for s in seeds for m in models)]
    lines = [f"# PI vs baseline on the synthetic world: {len(seeds)} seed(s) ({', '.join(map(str, seeds))})", "",
             describe_sizes(mode, size), "",
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
    if len(seeds) < 2:
        lines += ["", f"One seed: no interval can be computed (intervals need at least two seeds, e.g. --seeds "
                      f"0,1,2), so none of the {total} image-text benchmarks is counted as better or worse."]
    else:
        lines += ["", f"Paper-style count over the {total} image-text benchmarks (zero-shot and retrieval), counting "
                      f"only differences whose 95% interval excludes 0: PI better on {count['win']}, worse on "
                      f"{count['loss']}, too close to call on {count['open']}."]
    if wall_s is not None:
        lines += ["", f"Wall time: {wall_s:.0f} s for {len(seeds)} seed(s)."]
    return "\n".join(lines) + "\n"


def read_seed(path):
    """A seed's benchmarks.json: (mode, size, {model: {benchmark: value}}). An older demo.py wrote the benchmarks
    alone: their mode and size are None, and pool only with others of their kind."""
    with open(path) as f:
        record = json.load(f)
    if "benchmarks" not in record:
        return None, None, record
    return record["mode"], record["size"], record["benchmarks"]


def same_sizes(records):
    """None if every seed ran at the same sizes, else a message naming the first seeds that differ and how.
    records: {seed: (mode, size, benchmarks)}."""
    (s0, (mode0, size0, _)), *rest = records.items()
    for s, (mode, size, _) in rest:
        if (mode, size) != (mode0, size0):
            keys = sorted(k for k in set(size0 or {}) | set(size or {}) if (size0 or {}).get(k) != (size or {}).get(k))
            return (f"seed {s0} ran in {mode0 or 'an unrecorded'} mode and seed {s} in {mode or 'an unrecorded'} "
                    f"mode (sizes that differ: {', '.join(keys)}): --summary-only pools only seeds run at the "
                    f"same sizes")
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help=f"folder for everything: seed_<s>/ per seed (world, runs, evaluations, figures) and "
                        f"summary.md (default: {OUT['full']}/, or {OUT['quick']}/ with --quick)")
    p.add_argument("--quick", action="store_true", help="the smaller run the tests use (about a minute)")
    p.add_argument("--seeds", default=None, help="comma list of seeds, one experiment each (default: 0)")
    p.add_argument("--seed", type=int, default=None, help="a single seed (the same as --seeds N)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what an earlier run wrote into the seed folders asked for (without it a seed "
                        "folder that is not empty is refused, and nothing is deleted)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every step, side-by-side ones included (OMP_NUM_THREADS of each "
                        "subprocess; default: 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of every step (default: the cores available to this process left "
                        "after the threads of the steps that run at once, shared among them, at most 4)")
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: rebuild summary.md from <out>/seed_<s>/benchmarks.json of the given seeds "
                        "(e.g. after running one job per seed); refused if they ran at different sizes")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seed is not None:
        p.error("give --seeds or --seed, not both")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed or 0]
    except ValueError:
        p.error(f"--seeds wants integers separated by commas, got '{args.seeds}'")
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    if args.threads < 1 or (args.workers is not None and args.workers < 0):
        p.error("--threads must be at least 1 and --workers at least 0")
    mode = "quick" if args.quick else "full"
    out = os.path.abspath(args.out or OUT[mode])
    if args.summary_only:
        return summarise(p, out, seeds)
    taken = [d for d in (os.path.join(out, f"seed_{s}") for s in seeds) if os.path.isdir(d) and os.listdir(d)]
    if taken and not args.overwrite:
        p.error(f"{taken[0]} already holds a run: pass --overwrite to replace it, or choose another --out")
    t0 = time.time()
    per_seed = {}
    for seed in seeds:
        seed_dir = os.path.join(out, f"seed_{seed}")
        clear_seed(seed_dir)
        t = time.time()
        per_seed[seed] = experiment(seed_dir, seed, SIZES[mode], threads=args.threads, workers=args.workers)
        with open(os.path.join(seed_dir, "benchmarks.json"), "w") as f:  # kept if a later seed fails
            json.dump({"mode": mode, "size": SIZES[mode], "seed": seed, "wall_s": round(time.time() - t),
                       "benchmarks": per_seed[seed]}, f, indent=1)
        print(f"\nseed {seed} done after {time.time() - t0:.0f} s", flush=True)
    write_summary(out, summary_markdown(per_seed, seeds, mode, SIZES[mode], wall_s=time.time() - t0))


def summarise(p, out, seeds):
    """--summary-only: summary.md from each seed's benchmarks.json, if they all ran at the same sizes."""
    records = {}
    for seed in seeds:
        path = os.path.join(out, f"seed_{seed}", "benchmarks.json")
        if not os.path.isfile(path):
            p.error(f"--summary-only: {path} not found (run that seed first)")
        records[seed] = read_seed(path)
    mismatch = same_sizes(records)
    if mismatch:
        p.error(mismatch)
    mode, size, _ = records[seeds[0]]
    write_summary(out, summary_markdown({s: r[2] for s, r in records.items()}, seeds, mode, size))


def write_summary(out, md):
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    print(f"summary: {out}/summary.md; per seed: {out}/seed_<s>/eval_*/report.md and figures/")


if __name__ == "__main__":
    main()
