"""The README's demo, at its --quick size: every stage runs on the synthetic world and writes what the next needs;
and the statistics of its multi-seed summary, checked against scipy."""
import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy import stats

import demo


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    demo.main(["--quick", "--out", str(out), "--seeds", "3"])
    run = out / "seed_3"
    last = f"epoch_{demo.SIZES['quick']['clip_epochs']}.pt"
    for ckpt in ("nights/nights.pt", "pi/epoch_1.pt", f"pi/{last}", f"baseline/{last}", "qkv/finetuned.pt"):
        assert (run / ckpt).stat().st_size > 0, ckpt
    res = json.loads((run / "eval_pi_vs_baseline" / "results.json").read_text())
    assert res["ours"]["checkpoint"].endswith(f"pi/{last}")
    assert res["base"]["checkpoint"].endswith(f"baseline/{last}")
    comparison = res["comparison"]
    assert set(comparison["synthetic"]["zeroshot"]) == {"shape", "colour", "count"}
    assert {"i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"} <= set(comparison["synthetic"]["retrieval"])
    assert {"val", "test_imagenet", "test_no_imagenet"} <= set(comparison["nights"])
    for v in comparison["nights"].values():  # Δ is ours - base, in percentage points
        assert abs(v["delta"] - (v["ours"] - v["base"])) < 1e-9
    report = (run / "eval_pi_vs_baseline" / "report.md").read_text()
    for row in ("shape top1", "colour top1", "count top1", "retrieval i2t_r1", "| val |", "| test_imagenet |"):
        assert row in report, row
    # both figures, drawn from the stage-2 runs' per-epoch checkpoints and logs
    for png in ("scaling.png", "curves.png"):
        with Image.open(run / "figures" / png) as im:
            assert im.format == "PNG" and np.asarray(im.convert("L")).std() > 5, png
    rows = (run / "figures" / "scaling.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * demo.SIZES["quick"]["clip_epochs"]  # header + every epoch of PI and baseline
    # one seed: means without sd or interval, in summary.md and on stdout
    summary = (out / "summary.md").read_text()
    printed = capsys.readouterr().out
    assert summary in printed
    pi = res["ours"]["synthetic"]["zeroshot"]["shape"]["top1"]
    base = res["base"]["synthetic"]["zeroshot"]["shape"]["top1"]
    assert f"| zero-shot shape top1 | {pi:.1f} | {base:.1f} |" in summary
    assert f"| {pi - base:+.1f} | — |" in summary
    assert json.loads((run / "benchmarks.json").read_text())["PI"]["zero-shot shape top1"] == pi


def test_seeds_flag():
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "0,x"])
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "1,1"])
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "1", "--seed", "2"])


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 29, 100])
def test_t_quantile_matches_scipy(df):
    for p in (0.975, 0.95, 0.5, 0.025, 0.995):
        assert demo.student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-7, rel=1e-7)
    for x in (-3.0, -0.4, 0.0, 1.1, 7.0):
        assert demo.student_t_cdf(x, df) == pytest.approx(stats.t.cdf(x, df), abs=1e-9)


def test_mean_sd_and_paired_interval_match_scipy():
    rng = np.random.default_rng(0)
    ours, base = rng.normal(50, 5, 3), rng.normal(48, 5, 3)
    m, sd = demo.mean_sd(list(ours))
    assert m == pytest.approx(ours.mean()) and sd == pytest.approx(ours.std(ddof=1))
    assert demo.mean_sd([4.0]) == (4.0, None)
    d = ours - base
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    mean, low, high = demo.paired_interval(list(ours), list(base))
    assert (mean, low, high) == pytest.approx((d.mean(), lo, hi))
    assert demo.paired_interval([3.0], [1.0]) == (2.0, None, None)


def _seed_results(pi_shape, base_shape, pi_count, base_count):
    nights = {"NIGHTS 2AFC val": 90.0}
    return {"PI": {"zero-shot shape top1": pi_shape, "zero-shot count top1": pi_count, **nights},
            "baseline": {"zero-shot shape top1": base_shape, "zero-shot count top1": base_count, **nights},
            "human-later": {"zero-shot shape top1": 30.0, "zero-shot count top1": 30.0, **nights}}


def test_summary_counts_only_intervals_that_exclude_zero():
    # shape: PI ahead by 10 +- 1 in every run (interval excludes 0); count: ahead on average, but the runs
    # disagree (interval straddles 0). NIGHTS is reported but not counted (not an image-text benchmark).
    per_seed = {0: _seed_results(60, 50, 40, 20), 1: _seed_results(61, 50, 20, 30), 2: _seed_results(59, 50, 35, 30)}
    md = demo.summary_markdown(per_seed, [0, 1, 2], wall_s=12)
    d = np.array([10.0, 11.0, 9.0])
    lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
    assert f"| zero-shot shape top1 | 60.0 ± 1.0 | 50.0 ± 0.0 | 30.0 ± 0.0 | +10.0 | [{lo:+.1f}, {hi:+.1f}] |" in md
    assert "over the 2 image-text benchmarks" in md
    assert "PI better on 1, worse on 0, too close to call on 1" in md
    assert "| NIGHTS 2AFC val |" in md and "12 s for 3 seed(s)" in md
    # the same numbers with PI and baseline swapped: the win becomes a loss
    swapped = {s: {**r, "PI": r["baseline"], "baseline": r["PI"]} for s, r in per_seed.items()}
    assert "PI better on 0, worse on 1" in demo.summary_markdown(swapped, [0, 1, 2])


def test_benchmarks_reads_evaluate_results():
    res = {"synthetic": {"zeroshot": {"shape": {"top1": 41.0, "top5": None, "n": 10},
                                      "count": {"skipped": "missing", "path": "x"}},
                         "retrieval": {"i2t_r1": 12.0, "t2i_r5": 30.0, "n_images": 4}},
           "nights": {"val": {"2afc": 88.0, "n": 20}, "test": {"skipped": "missing", "path": "y"}}}
    assert demo.benchmarks(res) == {"zero-shot shape top1": 41.0, "retrieval i2t_r1": 12.0,
                                    "retrieval t2i_r5": 30.0, "NIGHTS 2AFC val": 88.0}
    assert math.isclose(demo.student_t_quantile(0.975, 2), 4.302652729749464, rel_tol=1e-9)


def test_summary_only_reads_seed_folders(tmp_path, capsys):
    """Seeds run as separate jobs: --summary-only trains nothing and summarises their benchmarks.json files."""
    per_seed = {0: _seed_results(60, 50, 40, 20), 1: _seed_results(61, 50, 20, 30), 2: _seed_results(59, 50, 35, 30)}
    for seed, res in per_seed.items():
        (tmp_path / f"seed_{seed}").mkdir()
        (tmp_path / f"seed_{seed}" / "benchmarks.json").write_text(json.dumps(res))
    demo.main(["--seeds", "0,1,2", "--summary-only", "--out", str(tmp_path)])
    assert (tmp_path / "summary.md").read_text() == demo.summary_markdown(per_seed, [0, 1, 2])
    assert "PI better on 1" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a seed that was never run is named, not skipped
        demo.main(["--seeds", "0,3", "--summary-only", "--out", str(tmp_path)])
    assert "seed_3/benchmarks.json" in capsys.readouterr().err
