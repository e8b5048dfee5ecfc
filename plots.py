"""Figures: training curves from log.jsonl files, and zero-shot accuracy against samples seen (PI paper Figures 3-4).

    python plots.py curves runs/pi/log.jsonl runs/baseline/log.jsonl --out curves.png
    python plots.py scaling results/scaling.csv --out scaling.png     # evaluate.py --scaling also draws it

The only file that imports matplotlib (a dev requirement): the training and evaluation scripts need just the five
runtime packages. The power-law fit lives in evaluate.py and is imported from there; evaluate.py never imports this
file (it runs `plots.py scaling` on the CSV it wrote), so the two do not import each other.
"""
import argparse
import csv
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from evaluate import fit_power_law  # noqa: E402

# what train_clip.py logs per step, and how each curve is best read
CURVES = (("loss", "contrastive loss (eq. 3)", "linear"), ("logit_scale", "logit scale exp(t)", "linear"),
          ("lr", "learning rate", "linear"), ("samples_per_s", "samples / s", "linear"))


def read_log(path):
    """The per-step records of a log.jsonl (lines with a "loss"); epoch markers and other lines are left out.
    A line that is not JSON is an error naming the file and line: a half-written last line is the only exception,
    since a run that is still going (or was killed) leaves one."""
    with open(path) as f:
        lines = f.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline yet: the writer was cut off mid-line
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({e})") from None
        if "step" in record and "loss" in record:
            out.append(record)
    return out


def plot_curves(logs, out, labels=None):
    """One figure, one panel per logged quantity (CURVES) against step, the runs overlaid. logs: log.jsonl paths."""
    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in logs]
    runs = [(label, read_log(path)) for label, path in zip(labels, logs)]
    if not any(records for _, records in runs):
        raise ValueError(f"no step records (lines with 'step' and 'loss') in {', '.join(logs)}")
    fig, axes = plt.subplots(1, len(CURVES), figsize=(3.2 * len(CURVES), 2.8))
    for ax, (key, title, scale) in zip(axes, CURVES):
        for label, records in runs:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, linewidth=1)
        ax.set_yscale(scale)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    return _save(fig, out)


def plot_scaling(rows, out, curves=None):
    """Accuracy against samples seen on log-log axes, one panel per curve (e.g. "synthetic shape top1"), every run
    on the same axes (PI and baseline side by side), each with its fitted power law dashed and β in the legend.
    rows: dicts with "run", "samples_seen" and a number per curve (evaluate.py's scaling.csv)."""
    curves = curves or [c for c in rows[0] if c not in ("run", "epoch", "samples_seen", "checkpoint")]
    runs = list(dict.fromkeys(r.get("run", "") for r in rows))
    panels = []
    for c in curves:  # a panel for every curve with at least two positive points in some run
        by_run = {run: sorted((float(r["samples_seen"]), float(r[c])) for r in rows
                              if r.get("run", "") == run and r.get(c) not in (None, ""))
                  for run in runs}
        if any(fit_power_law(*zip(*p)) for p in by_run.values() if p):
            panels.append((c, by_run))
    if not panels:
        raise ValueError("no curve has two positive points to fit a power law to")
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.0 * nrows), squeeze=False)
    for ax, (c, by_run) in zip(axes.flat, panels):
        for k, (run, pts) in enumerate(by_run.items()):
            if not pts:
                continue
            colour = f"C{k}"
            n, acc = zip(*pts)
            fit = fit_power_law(n, acc)
            label = f"{run}: β = {fit['beta']:.3f}" if fit else run
            ax.plot(n, acc, "o", color=colour, markersize=4, label=label)
            if fit:
                xs = [min(n) * (max(n) / min(n)) ** (i / 20) for i in range(21)]
                ax.plot(xs, [fit["a"] * x ** fit["beta"] for x in xs], "--", color=colour, linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("samples seen", fontsize=8)
        ax.tick_params(labelsize=7, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _save(fig, out)


def read_scaling_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _save(fig, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("curves", help="loss, logit scale, learning rate and samples/s against step")
    c.add_argument("logs", nargs="+", help="log.jsonl files of train_clip.py runs")
    c.add_argument("--labels", help="comma list, one per log (default: each log's folder name)")
    c.add_argument("--out", default="curves.png")
    s = sub.add_parser("scaling", help="accuracy against samples seen, log-log, with power-law fits")
    s.add_argument("csv", help="scaling.csv written by evaluate.py --scaling")
    s.add_argument("--out", default="scaling.png")
    s.add_argument("--curves", help="comma list of the CSV's curves to draw (default: every curve)")
    args = p.parse_args(argv)
    if args.what == "curves":
        labels = args.labels.split(",") if args.labels else None
        if labels and len(labels) != len(args.logs):
            p.error(f"--labels has {len(labels)} names for {len(args.logs)} logs")
        print("wrote", plot_curves(args.logs, args.out, labels))
    else:
        curves = args.curves.split(",") if args.curves else None
        print("wrote", plot_scaling(read_scaling_csv(args.csv), args.out, curves=curves))


if __name__ == "__main__":
    main()
