"""plots.py: real PNG files with plotted content, from real log.jsonl / scaling.csv files; bad lines named."""
import json

import numpy as np
import pytest
from PIL import Image

import evaluate as ev
import plots


def _log(path, n_steps, seed, half_line=False):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for step in range(1, n_steps + 1):  # the records train_clip.py writes, and its epoch markers
            f.write(json.dumps({"step": step, "epoch": 0, "samples": 64 * step, "loss": 5.5 - 0.02 * step,
                                "lr": 1e-3 * min(1, step / 5), "logit_scale": 14.3 + 0.1 * step,
                                "samples_per_s": float(rng.uniform(200, 300)), "data_wait": 0.3,
                                "skipped": {"no image": 0}}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"epoch": step // 10, "step": step, "samples": 64 * step}) + "\n")
        if half_line:
            f.write('{"step": 99, "loss": 1.')
    return str(path)


def _plotted_fraction(png):
    """The share of pixels that are neither the white canvas nor near-white: 0 for a blank figure."""
    with Image.open(png) as im:
        assert im.format == "PNG"
        rgb = np.asarray(im.convert("RGB"), np.int16)
    return float((np.abs(rgb - 255).sum(-1) > 30).mean()), rgb


def test_curves_png_has_every_run_in_every_panel(tmp_path):
    a = _log(tmp_path / "a.jsonl", 30, seed=0)
    b = _log(tmp_path / "b.jsonl", 20, seed=1, half_line=True)  # a run still going: its last line is half written
    out = plots.plot_curves([a, b], str(tmp_path / "curves.png"), labels=["PI", "baseline"])
    frac, rgb = _plotted_fraction(out)
    assert 0.01 < frac < 0.6  # lines, axes and text, not a blank (or black) canvas
    # matplotlib's first two colours (C0 blue, C1 orange) both appear: both runs are drawn
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(rgb - np.array(colour)).sum(-1) < 40).sum() > 50, colour
    # the same plot from the command line
    plots.main(["curves", a, b, "--out", str(tmp_path / "cli.png")])
    assert _plotted_fraction(tmp_path / "cli.png")[0] > 0.01


def test_read_log_names_the_bad_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2"):
        plots.read_log(str(path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"epoch": 1, "step": 3}\n')
    with pytest.raises(ValueError, match="no step records"):
        plots.plot_curves([str(empty)], str(tmp_path / "x.png"))


def test_scaling_png_log_log_with_fits(tmp_path):
    n = [1000, 2000, 4000, 8000]
    rows = [{"run": run, "epoch": i + 1, "samples_seen": s, "shape top1": a * s ** beta, "colour top1": 50.0}
            for run, a, beta in (("pi", 2.0, 0.3), ("baseline", 1.5, 0.25)) for i, s in enumerate(n)]
    out = plots.plot_scaling(rows, str(tmp_path / "scaling.png"), curves=["shape top1", "colour top1"])
    frac, rgb = _plotted_fraction(out)
    assert 0.01 < frac < 0.6
    for colour in ((31, 119, 180), (255, 127, 14)):  # both runs on the same axes
        assert (np.abs(rgb - np.array(colour)).sum(-1) < 40).sum() > 50, colour
    # the exponent in the legend is the least-squares fit evaluate.fit_power_law gives (exact points: β itself)
    fit = ev.fit_power_law(n, [2.0 * s ** 0.3 for s in n])
    assert fit["beta"] == pytest.approx(0.3)


def _stage1_log(path, percent=False):
    """The lines train_nights.py / finetune_qkv.py write: epoch 0 (before training), then one per epoch."""
    unit = 100 if percent else 1
    lines = [{"epoch": 0, "step": 0, "val_loss": 0.06, "val_2afc": 0.62 * unit}]
    lines += [{"epoch": e, "step": 10 * e, "train_loss": 0.05 / e, "lr": 1e-3 / e, "val_loss": 0.05 / e,
               "val_2afc": (0.62 + 0.05 * e) * unit, "epoch_s": 3.0} for e in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path)


def _panels(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def _check_axes_readable(fig):
    """Every visible panel has both axes labelled, plain tick labels (no 10^k), and no two tick labels overlap."""
    fig.canvas.draw()
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
            assert len(labels) >= 2, (ax.get_title(), [t.get_text() for t in labels])
            for t in labels:
                assert "10^" not in t.get_text() and "times" not in t.get_text(), t.get_text()
            boxes = [t.get_window_extent() for t in labels]
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    assert not a.overlaps(b), (ax.get_title(), [t.get_text() for t in labels])
        assert not ax.yaxis.get_offset_text().get_text(), ax.get_title()  # no "1e-3" over the title


def test_curves_read_stage1_logs_beside_stage2_ones(tmp_path):
    """train_nights.py's log (2AFC as a fraction) and a log with 2AFC in percent, with a train_clip.py log: one row
    of panels per kind, 2AFC in percent in both, every axis labelled."""
    stage2 = _log(tmp_path / "pi.jsonl", 30, seed=0)
    nights = _stage1_log(tmp_path / "nights.jsonl")
    qkv = _stage1_log(tmp_path / "qkv.jsonl", percent=True)
    fig = plots.curves_figure([stage2, nights, qkv], labels=["PI", "stage 1", "human-later"])
    panels = _panels(fig)
    assert {"contrastive loss (eq. 3)", "validation 2AFC"} <= set(panels)
    for line in panels["validation 2AFC"].get_lines():
        assert list(line.get_xdata()) == [0, 1, 2, 3]
        assert list(line.get_ydata()) == pytest.approx([62, 67, 72, 77])
    assert panels["validation 2AFC"].get_ylabel() == "2AFC agreement (%)"
    assert len(panels["hinge loss (eq. 2): train —, val - -"].get_lines()) == 4  # train and val of both runs
    _check_axes_readable(fig)
    # from the command line, a stage-1 log alone
    plots.main(["curves", nights, "--out", str(tmp_path / "stage1.png")])
    assert _plotted_fraction(tmp_path / "stage1.png")[0] > 0.01


def test_read_log_keeps_the_last_record_of_a_step_logged_twice(tmp_path):
    path = tmp_path / "log.jsonl"  # killed after step 3, resumed from step 1
    path.write_text("".join(json.dumps({"step": s, "loss": loss}) + "\n"
                            for s, loss in ((1, 3.0), (2, 2.9), (3, 2.8), (2, 2.7), (3, 2.6))))
    assert [(r["step"], r["loss"]) for r in plots.read_log(str(path))] == [(1, 3.0), (2, 2.7), (3, 2.6)]


def test_scaling_axes_plain_ticks_and_a_zero_point(tmp_path):
    """Percentages within one point of 100, a curve over 20-70%, and a recall that is 0 at the first checkpoint:
    plain tick labels that do not overlap, both axes labelled with units, and the zero named in the legend."""
    n = [30000 * e for e in range(1, 11)]
    rows = [{"run": run, "samples_seen": s, "shape top1": 20 * (1 + k) * e ** 0.45,
             "colour top1": 100.0 if e % 3 else 99.2, "i2t_r1": 0.0 if (run, e) == ("pi", 1) else 9.0 * e ** 0.6}
            for k, run in enumerate(("pi", "baseline")) for e, s in enumerate(n, 1)]
    fig = plots.scaling_figure(rows, curves=["shape top1", "colour top1", "i2t_r1"])
    panels = _panels(fig)
    assert panels["shape top1"].get_ylabel() == "top-1 accuracy (%)"
    assert panels["i2t_r1"].get_ylabel() == "recall@1 (%)"
    assert panels["i2t_r1"].get_xlabel() == "samples seen (image-text pairs)"
    legend = [t.get_text() for t in panels["i2t_r1"].get_legend().get_texts()]
    assert legend[0].startswith("pi: β = ") and "1 at 0" in legend[0]
    # the fit leaves the zero out: β from the nine positive points
    want = ev.fit_power_law(n[1:], [9.0 * e ** 0.6 for e in range(2, 11)])["beta"]
    assert legend[0].startswith(f"pi: β = {want:.3f}")
    _check_axes_readable(fig)
    colour = [t.get_text() for t in panels["colour top1"].yaxis.get_ticklabels() if t.get_text()]
    assert all(99 <= float(t) <= 100 for t in colour), colour


@pytest.mark.parametrize("lo, hi", [(25.0, 80.0), (99.1, 100.05), (8.0, 40.0), (27000.0, 330000.0), (0.5, 99.0)])
def test_log_ticks_are_inside_and_apart(lo, hi):
    ticks = plots.log_ticks(lo, hi, min_gap=0.1)
    assert len(ticks) >= 3 and all(lo <= t <= hi for t in ticks)
    gaps = np.diff(np.log10(ticks)) / np.log10(hi / lo)
    assert (gaps >= 0.1 - 1e-9).all(), ticks


def test_plain_numbers():
    assert [plots.plain_number(v) for v in (30000, 300000, 1.5e6, 15e6, 99.6, 100.0, 0.5)] == \
        ["30k", "300k", "1.5M", "15M", "99.6", "100", "0.5"]
    assert plots.scaled_number(0.0015, power=-3) == "1.5"


def test_scaling_without_any_fittable_curve_is_a_clear_error(tmp_path):
    rows = [{"run": "pi", "samples_seen": 1000, "shape top1": 0.0}, {"run": "pi", "samples_seen": 2000,
                                                                     "shape top1": 0.0}]
    with pytest.raises(ValueError, match="two positive points"):
        plots.plot_scaling(rows, str(tmp_path / "s.png"))


def test_evaluate_scaling_draws_pi_and_baseline_on_shared_axes(tmp_path):
    """evaluate.py --scaling with two run folders: one CSV with a run column, fits per run, and scaling.png."""
    import csv

    import torch

    import data
    from model import CLIP, CLIPConfig
    from synthetic_world import make_synthetic_world

    world = make_synthetic_world(str(tmp_path / "world"), seed=0, n_pairs=0, n_triplets=20, n_test_per_class=3,
                                 n_retrieval=6, image_size=32)
    merges = str(tmp_path / "bpe.txt.gz")
    with open(world.retrieval_json) as f:
        caps = [s["raw"] for im in json.load(f)["images"] for s in im["sentences"]]
    data.learn_bpe(caps * 3, merges, 64)
    vocab = data.Tokenizer(merges).vocab_size
    (tmp_path / "cfg.json").write_text(json.dumps({"model": "tiny", "vocab_size": vocab}))
    for run, seed in (("pi", 0), ("baseline", 10)):
        (tmp_path / run).mkdir()
        for epoch in (1, 2, 3):
            torch.manual_seed(seed + epoch)
            torch.save(CLIP(CLIPConfig.tiny(vocab_size=vocab)).state_dict(), tmp_path / run / f"epoch_{epoch}.pt")
    out = tmp_path / "out"
    ev.main(["--scaling", f"{tmp_path / 'pi'},{tmp_path / 'baseline'}", "--samples-per-epoch", "500",
             "--config", str(tmp_path / "cfg.json"), "--merges", merges, "--synthetic", world.root,
             "--datasets", "", "--retrieval", "", "--out", str(out), "--workers", "0", "--device", "cpu"])
    rows = list(csv.DictReader(open(out / "scaling.csv")))
    assert [(r["run"], int(r["samples_seen"])) for r in rows] == [(run, 500 * e) for run in ("pi", "baseline")
                                                                  for e in (1, 2, 3)]
    fits = json.loads((out / "scaling_fit.json").read_text())
    for run in ("pi", "baseline"):
        accs = [float(r["synthetic shape top1"]) for r in rows if r["run"] == run]
        want = ev.fit_power_law([500, 1000, 1500], accs)
        assert (fits[f"{run}: synthetic shape top1"] or {}).get("beta") == pytest.approx((want or {}).get("beta"))
    frac, rgb = _plotted_fraction(out / "scaling.png")
    assert frac > 0.01
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(rgb - np.array(colour)).sum(-1) < 40).sum() > 20, colour
