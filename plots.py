"""Figures: training curves from log.jsonl files, and zero-shot accuracy against samples seen (PI paper Figures 3-4).

    python plots.py curves runs/pi/log.jsonl runs/baseline/log.jsonl --out curves.png
    python plots.py curves runs/nights/log.jsonl runs/qkv/log.jsonl --labels "stage 1,human-later" --out stage1.png
    python plots.py scaling results/scaling.csv --out scaling.png     # evaluate.py --scaling also draws it

The only file that imports matplotlib (a dev requirement): the training and evaluation scripts need just the five
runtime packages. The power-law fit lives in evaluate.py and is imported from there; evaluate.py never imports this
file (it runs `plots.py scaling` on the CSV it wrote), so the two do not import each other.
"""
import argparse
import csv
import functools
import json
import math
import os
import re

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from evaluate import fit_power_law  # noqa: E402

# The panels of each kind of log: (keys drawn, panel title, y-axis label). train_clip.py (stage 2) logs a line per
# step with "loss"; train_nights.py and finetune_qkv.py (stage 1, human-later) a line per epoch with "val_2afc",
# epoch 0 being the model before training. With two keys, the first is drawn solid and the second dashed.
STEP_CURVES = ((("loss",), "contrastive loss (eq. 3)", "InfoNCE loss (nats)"),
               (("logit_scale",), "logit scale exp(t)", "exp(t) (no unit)"),
               (("lr",), "learning rate", "learning rate (per step)"),
               (("samples_per_s",), "throughput", "image-text pairs / s"))
EPOCH_CURVES = ((("train_loss", "val_loss"), "hinge loss (eq. 2): train —, val - -", "hinge loss"),
                (("val_2afc",), "validation 2AFC", "2AFC agreement (%)"),
                (("lr",), "learning rate", "learning rate (at epoch end)"))
KINDS = {"step": (STEP_CURVES, "optimiser step"), "epoch": (EPOCH_CURVES, "epoch (0: before training)")}


def read_records(path):
    """Every JSON record of a log.jsonl. A line that is not JSON is an error naming the file and line: a
    half-written last line is the only exception, since a run that is still going (or was killed) leaves one."""
    with open(path) as f:
        lines = f.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline yet: the writer was cut off mid-line
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({e})") from None
    return out


def read_log(path):
    """The per-step records of a train_clip.py log.jsonl (lines with "step" and "loss"); epoch markers and other
    lines are left out. A step logged twice (a run resumed from before it) keeps its last record."""
    return list({r["step"]: r for r in read_records(path) if "step" in r and "loss" in r}.values())


def read_epochs(path):
    """The per-epoch records of a train_nights.py / finetune_qkv.py log.jsonl (lines with "val_2afc"), the last
    record of each epoch, with 2AFC in percent whichever unit the log used (a fraction is at most 1; chance is 50%)."""
    records = list({r["epoch"]: r for r in read_records(path) if "epoch" in r and "val_2afc" in r}.values())
    if records and all(r["val_2afc"] <= 1 for r in records):
        records = [{**r, "val_2afc": 100 * r["val_2afc"]} for r in records]
    return records


def read_any_log(path):
    """(kind, records) of a log.jsonl: "epoch" for stage-1 logs (they report val_2afc), else "step"."""
    epochs = read_epochs(path)
    return ("epoch", epochs) if epochs else ("step", read_log(path))


def plot_curves(logs, out, labels=None):
    """The training curves of the runs in `logs` (log.jsonl paths), overlaid, one panel per logged quantity: a row of
    panels against optimiser step for stage-2 logs and one against epoch for stage-1 logs, if both are given.
    Written to the PNG `out`; returns its path."""
    return _save(curves_figure(logs, labels), out)


def curves_figure(logs, labels=None):
    """The matplotlib figure plot_curves writes."""
    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in logs]
    runs = [(label, *read_any_log(path)) for label, path in zip(labels, logs)]
    empty = [path for path, (_, _, records) in zip(logs, runs) if not records]
    if empty:
        raise ValueError(f"no step records (lines with 'step' and 'loss') nor epoch records (lines with 'val_2afc') "
                         f"in {', '.join(empty)}")
    kinds = list(dict.fromkeys(kind for _, kind, _ in runs))
    cols = max(len(KINDS[k][0]) for k in kinds)
    fig, axes = plt.subplots(len(kinds), cols, figsize=(3.3 * cols, 2.9 * len(kinds)), squeeze=False, sharex="row")
    for row, kind in zip(axes, kinds):
        panels, xlabel = KINDS[kind]
        x = "step" if kind == "step" else "epoch"
        for ax, (keys, title, ylabel) in zip(row, panels):
            for k, (label, run_kind, records) in enumerate(runs):
                if run_kind != kind:
                    continue
                for key, style in zip(keys, ("-", "--")):
                    pts = sorted((r[x], r[key]) for r in records if r.get(key) is not None)
                    if pts:
                        ax.plot(*zip(*pts), style, color=f"C{k}", linewidth=1,
                                marker="o" if kind == "epoch" else None, markersize=3,
                                label=label if key == keys[0] else None)
            _style_linear(ax, title, xlabel, ylabel, integer_x=kind == "epoch")
        row[0].legend(fontsize=7)
        for ax in row[len(panels):]:
            ax.set_visible(False)
    fig.tight_layout()
    return fig


def _style_linear(ax, title, xlabel, ylabel, integer_x):
    """Titles, labels and at most 5-6 ticks per axis (no crowding). Small values (a learning rate) are ticked as
    multiples of a power of ten named in the axis label, not with matplotlib's offset text, which hits the title."""
    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=5, integer=integer_x))
    ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=6))
    top = max(abs(v) for v in ax.get_ylim())
    power = math.floor(math.log10(top)) if 0 < top < 1e-2 else 0
    if power:
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(functools.partial(scaled_number, power=power)))
        ylabel += f" (×1e{power})"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)


def scaled_number(v, _=None, power=0):
    """A tick label in units of 10**power: 0.0015 with power -3 -> 1.5."""
    return f"{v / 10.0 ** power:.3g}"


def metric_label(curve):
    """The y-axis label of a scaling curve, from its name (evaluate.py's scaling.csv columns)."""
    m = re.search(r"_r(\d+)$", curve)
    if m:
        return f"recall@{m.group(1)} (%)"
    m = re.search(r"top(\d+)$", curve)
    return f"top-{m.group(1)} accuracy (%)" if m else "%"


def log_ticks(lo, hi, min_gap):
    """Tick values for a log axis over [lo, hi] that read plainly: the 1, 2, 3, 4, 5, 7 of each decade, or, on an axis
    too narrow for three of those, the evenly spaced round numbers a linear axis would use; none closer to the
    previous than min_gap of the axis length (in log space), so that labels never overlap."""
    span = math.log10(hi / lo)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = _spaced(sorted(m * 10.0 ** e for e in decades for m in (1, 2, 3, 4, 5, 7)), lo, hi, min_gap * span)
    if len(ticks) < 3:
        ticks = _spaced(list(ticker.MaxNLocator(nbins=4).tick_values(lo, hi)), lo, hi, min_gap * span)
    return ticks


def _spaced(values, lo, hi, gap):
    """The sorted values within [lo, hi], each at least `gap` decades above the previous one kept."""
    kept = []
    for v in values:
        if lo <= v <= hi and (not kept or math.log10(v / kept[-1]) >= gap):
            kept.append(v)
    return kept


def plain_number(v, _=None):
    """30000 -> 30k, 1500000 -> 1.5M, 99.6 -> 99.6: tick labels without 10^k."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.4g}"


def _set_log_ticks(axis, lo, hi, min_gap):
    axis.set_major_locator(ticker.FixedLocator(log_ticks(lo, hi, min_gap)))
    axis.set_major_formatter(ticker.FuncFormatter(plain_number))
    axis.set_minor_formatter(ticker.NullFormatter())  # matplotlib would label minor ticks on a narrow log axis


def plot_scaling(rows, out, curves=None):
    """Accuracy against samples seen on log-log axes, one panel per curve (e.g. "synthetic shape top1"), every run
    on the same axes (PI and baseline side by side), each with its fitted power law dashed and β in the legend.
    A point at 0 has no place on a log axis: it is marked by a triangle at the bottom edge and counted in the
    legend, and the fit leaves it out. rows: dicts with "run", "samples_seen" and a number per curve (evaluate.py's
    scaling.csv). Written to the PNG `out`; returns its path."""
    return _save(scaling_figure(rows, curves), out)


def scaling_figure(rows, curves=None):
    """The matplotlib figure plot_scaling writes."""
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
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.2 * nrows), squeeze=False)
    for ax, (c, by_run) in zip(axes.flat, panels):
        for k, (run, pts) in enumerate(by_run.items()):
            _draw_run(ax, run, pts, colour=f"C{k}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        if any(a <= 0 for pts in by_run.values() for _, a in pts):
            y0 /= (y1 / y0) ** 0.12  # a band at the bottom for the markers of points at 0, clear of the others
        _set_log_ticks(ax.xaxis, x0, x1, min_gap=0.15)  # labels like "300k" are wider than they are tall
        _set_log_ticks(ax.yaxis, y0, y1, min_gap=0.1)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("samples seen (image-text pairs)", fontsize=8)
        ax.set_ylabel(metric_label(c), fontsize=8)
        ax.tick_params(labelsize=7, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _draw_run(ax, run, pts, colour):
    """One run's points of one curve, its fitted power law, and its points at 0 (or below) on the bottom edge."""
    positive = [(n, a) for n, a in pts if a > 0]
    zeros = [n for n, a in pts if a <= 0]
    fit = fit_power_law(*zip(*pts)) if pts else None
    label = f"{run}: β = {round(fit['beta'], 3) + 0.0:.3f}" if fit else run  # + 0.0: no "-0.000"
    if zeros:
        label += f" ({len(zeros)} at 0: ▼)"
        # x in data coordinates, y just above the axes' bottom edge (the log axis has no 0)
        ax.plot(zeros, [0.03] * len(zeros), "v", color=colour, markersize=5, transform=ax.get_xaxis_transform())
    if positive:
        n, acc = zip(*positive)
        ax.plot(n, acc, "o", color=colour, markersize=4, label=label)
        if fit:
            xs = [min(n) * (max(n) / min(n)) ** (i / 20) for i in range(21)]
            ax.plot(xs, [fit["a"] * x ** fit["beta"] for x in xs], "--", color=colour, linewidth=1)


def read_scaling_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _save(fig, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("curves", help="training curves: loss, logit scale, learning rate and samples/s against step "
                                      "(stage 2); hinge loss, val 2AFC and learning rate against epoch (stage 1)")
    c.add_argument("logs", nargs="+", help="log.jsonl files of train_clip.py, train_nights.py or finetune_qkv.py "
                                           "runs, in any mix")
    c.add_argument("--labels", help="comma list, one per log (default: each log's folder name)")
    c.add_argument("--out", default="curves.png", help="the PNG to write (default: curves.png)")
    s = sub.add_parser("scaling", help="accuracy against samples seen, log-log, with power-law fits")
    s.add_argument("csv", help="scaling.csv written by evaluate.py --scaling")
    s.add_argument("--out", default="scaling.png", help="the PNG to write (default: scaling.png)")
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
