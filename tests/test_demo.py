"""The README's demo, at its --quick size: every stage runs on the synthetic world and writes what the next needs;
and the statistics of its multi-seed summary, checked against scipy."""
import json
import math
import os
import subprocess

import numpy as np
import pytest
from PIL import Image
from scipy import stats

import demo


def test_demo_pipeline_end_to_end(tmp_path, capsys, monkeypatch):
    steps = []  # (script, OMP_NUM_THREADS) of every subprocess the demo starts
    popen = subprocess.Popen

    def recording_popen(cmd, *args, **kwargs):
        steps.append((os.path.basename(cmd[1]), (kwargs.get("env") or {}).get("OMP_NUM_THREADS")))
        return popen(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    out = tmp_path / "demo"
    demo.main(["--quick", "--out", str(out), "--seeds", "3"])
    monkeypatch.setattr(subprocess, "Popen", popen)
    run = out / "seed_3"
    last = f"epoch_{demo.SIZES['quick']['clip_epochs']}.pt"
    for ckpt in ("nights/nights.pt", "pi/epoch_1.pt", f"pi/{last}", f"baseline/{last}", "qkv/finetuned.pt"):
        assert (run / ckpt).stat().st_size > 0, ckpt
    # every step ran with its thread count set: stage 1, the two stage-2 runs, the four steps after, the last eval
    assert [s for s, _ in steps] == ["train_nights.py", "train_clip.py", "train_clip.py", "finetune_qkv.py",
                                     "evaluate.py", "evaluate.py", "plots.py", "evaluate.py"]
    assert {t for _, t in steps} == {"1"}
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
    # both figures, drawn from the runs' per-epoch checkpoints and logs (stage 1's too)
    for png in ("scaling.png", "curves.png"):
        with Image.open(run / "figures" / png) as im:
            assert im.format == "PNG" and np.asarray(im.convert("L")).std() > 5, png
    assert "wrote" in (run / "curves.out").read_text()
    rows = (run / "figures" / "scaling.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * demo.SIZES["quick"]["clip_epochs"]  # header + every epoch of PI and baseline
    # progress: the world build, a line per epoch from each side-by-side run, and one when each step ends
    printed = capsys.readouterr().out
    for line in ("world: NIGHTS triplets 200/200", "world: image-caption shards 1/1", "[pi] epoch 1/2, step",
                 "[pi] epoch 2/2", "[baseline] epoch 2/2", "[qkv] epoch 1/1", "val 2AFC", "[pi] done after",
                 "[eval_pi_vs_baseline] done after", "[curves] done after"):
        assert line in printed, line
    # one seed: means without sd or interval, the mode and sizes, in summary.md and on stdout
    summary = (out / "summary.md").read_text()
    assert summary in printed
    assert demo.describe_sizes("quick", demo.SIZES["quick"]) in summary and "Mode: quick." in summary
    assert "intervals need at least two seeds" in summary and "too close to call" not in summary
    pi = res["ours"]["synthetic"]["zeroshot"]["shape"]["top1"]
    base = res["base"]["synthetic"]["zeroshot"]["shape"]["top1"]
    assert f"| zero-shot shape top1 | {pi:.1f} | {base:.1f} |" in summary
    assert f"| {pi - base:+.1f} | — |" in summary
    record = json.loads((run / "benchmarks.json").read_text())
    assert record["mode"] == "quick" and record["size"] == demo.SIZES["quick"]
    assert record["benchmarks"]["PI"]["zero-shot shape top1"] == pi
    # the same command again refuses, and deletes nothing
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--out", str(out), "--seeds", "3"])
    assert "seed_3 already holds a run: pass --overwrite" in capsys.readouterr().err
    assert (run / "nights" / "nights.pt").stat().st_size > 0 and (run / "pi" / last).is_file()


def test_quick_has_its_own_folder_and_a_run_is_never_replaced_unasked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_out" / "seed_0").mkdir(parents=True)  # a full run
    (tmp_path / "demo_out" / "seed_0" / "benchmarks.json").write_text("{}")
    (tmp_path / "demo_out_quick" / "seed_0").mkdir(parents=True)  # and a quick one
    (tmp_path / "demo_out_quick" / "seed_0" / "benchmarks.json").write_text("{}")
    for argv, folder in ((["--quick"], "demo_out_quick"), ([], "demo_out")):
        with pytest.raises(SystemExit):
            demo.main(argv)
        assert f"{tmp_path / folder / 'seed_0'} already holds a run" in capsys.readouterr().err
    assert (tmp_path / "demo_out" / "seed_0" / "benchmarks.json").is_file()


def test_overwrite_removes_only_what_the_demo_wrote(tmp_path):
    for name in demo.RUNS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.pt").write_bytes(b"0")
    for name in demo.FILES:
        (tmp_path / name).write_text("0")
    (tmp_path / "notes.txt").write_text("mine")
    demo.clear_seed(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_follow_prints_a_line_per_epoch(tmp_path):
    """What run_side_by_side prints from a train_clip.py log (step lines with "loss", epoch lines without) and a
    train_nights.py log (epoch 0 is the start, 2AFC a fraction), read as they grow, half-written lines later."""
    log = tmp_path / "log.jsonl"
    follow = demo.Follow("pi", str(log), epochs=2)
    assert follow.new_lines() == []  # no log yet
    log.write_text(json.dumps({"step": 1, "epoch": 1, "loss": 4.0}) + "\n" + json.dumps({"step": 2, "loss": 3.5})
                   + "\n" + json.dumps({"epoch": 1, "step": 2, "samples": 256}) + "\n" + '{"step": 3, "lo')
    lines = follow.new_lines()
    assert len(lines) == 1 and lines[0].startswith("  [pi] epoch 1/2, step 2, loss 3.500 (")
    with open(log, "a") as f:
        f.write('ss": 3.0}\n' + json.dumps({"epoch": 2, "step": 3}) + "\n")
    assert follow.new_lines()[0].startswith("  [pi] epoch 2/2, step 3, loss 3.000")
    nights = tmp_path / "nights.jsonl"
    nights.write_text(json.dumps({"epoch": 0, "step": 0, "val_2afc": 0.6}) + "\n" +
                      json.dumps({"epoch": 1, "step": 4, "train_loss": 0.04, "val_2afc": 0.875}) + "\n")
    lines = demo.Follow("qkv", str(nights), epochs=1).new_lines()
    assert len(lines) == 1 and lines[0].startswith("  [qkv] epoch 1/1, step 4, loss 0.040, val 2AFC 87.5%")


def test_default_workers_share_the_available_cores(monkeypatch):
    monkeypatch.setattr(demo, "available_cores", lambda: 2)
    assert [demo.default_workers(1, n) for n in (1, 2, 4)] == [1, 0, 0]
    monkeypatch.setattr(demo, "available_cores", lambda: 16)
    assert [demo.default_workers(1, n) for n in (1, 2, 4)] == [4, 4, 3]


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
    md = demo.summary_markdown(per_seed, [0, 1, 2], "full", demo.SIZES["full"], wall_s=12)
    d = np.array([10.0, 11.0, 9.0])
    lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
    assert f"| zero-shot shape top1 | 60.0 ± 1.0 | 50.0 ± 0.0 | 30.0 ± 0.0 | +10.0 | [{lo:+.1f}, {hi:+.1f}] |" in md
    assert "over the 2 image-text benchmarks" in md
    assert "PI better on 1, worse on 0, too close to call on 1" in md
    assert "| NIGHTS 2AFC val |" in md and "12 s for 3 seed(s)" in md
    # the same numbers with PI and baseline swapped: the win becomes a loss
    swapped = {s: {**r, "PI": r["baseline"], "baseline": r["PI"]} for s, r in per_seed.items()}
    assert "PI better on 0, worse on 1" in demo.summary_markdown(swapped, [0, 1, 2], "full", demo.SIZES["full"])
    assert "Mode: full. World: 30,000 image-caption pairs, 2,000 triplets" in md
    one = demo.summary_markdown({0: per_seed[0]}, [0], "full", demo.SIZES["full"])
    assert "One seed: no interval can be computed" in one and "too close to call" not in one


def test_benchmarks_reads_evaluate_results():
    res = {"synthetic": {"zeroshot": {"shape": {"top1": 41.0, "top5": None, "n": 10},
                                      "count": {"skipped": "missing", "path": "x"}},
                         "retrieval": {"i2t_r1": 12.0, "t2i_r5": 30.0, "n_images": 4}},
           "nights": {"val": {"2afc": 88.0, "n": 20}, "test": {"skipped": "missing", "path": "y"}}}
    assert demo.benchmarks(res) == {"zero-shot shape top1": 41.0, "retrieval i2t_r1": 12.0,
                                    "retrieval t2i_r5": 30.0, "NIGHTS 2AFC val": 88.0}
    assert math.isclose(demo.student_t_quantile(0.975, 2), 4.302652729749464, rel_tol=1e-9)


def _write_seed(root, seed, res, mode="full"):
    (root / f"seed_{seed}").mkdir(exist_ok=True)
    record = res if mode is None else {"mode": mode, "size": demo.SIZES[mode], "seed": seed, "benchmarks": res}
    (root / f"seed_{seed}" / "benchmarks.json").write_text(json.dumps(record))


def test_summary_only_reads_seed_folders(tmp_path, capsys):
    """Seeds run as separate jobs: --summary-only trains nothing and summarises their benchmarks.json files."""
    per_seed = {0: _seed_results(60, 50, 40, 20), 1: _seed_results(61, 50, 20, 30), 2: _seed_results(59, 50, 35, 30)}
    for seed, res in per_seed.items():
        _write_seed(tmp_path, seed, res)
    demo.main(["--seeds", "0,1,2", "--summary-only", "--out", str(tmp_path)])
    assert (tmp_path / "summary.md").read_text() == demo.summary_markdown(per_seed, [0, 1, 2], "full",
                                                                          demo.SIZES["full"])
    assert "PI better on 1" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a seed that was never run is named, not skipped
        demo.main(["--seeds", "0,3", "--summary-only", "--out", str(tmp_path)])
    assert "seed_3/benchmarks.json" in capsys.readouterr().err


def test_summary_only_refuses_seeds_run_at_different_sizes(tmp_path, capsys):
    _write_seed(tmp_path, 0, _seed_results(60, 50, 40, 20))
    _write_seed(tmp_path, 1, _seed_results(61, 50, 20, 30), mode="quick")
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "0,1", "--summary-only", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "seed 0 ran in full mode and seed 1 in quick mode" in err and "clip_epochs" in err
    assert not (tmp_path / "summary.md").exists()
    # benchmarks.json files of an older demo.py (no mode recorded) pool with each other, and say so
    _write_seed(tmp_path, 2, _seed_results(59, 50, 35, 30), mode=None)
    _write_seed(tmp_path, 3, _seed_results(60, 50, 35, 30), mode=None)
    demo.main(["--seeds", "2,3", "--summary-only", "--out", str(tmp_path)])
    assert "Mode and sizes not recorded" in (tmp_path / "summary.md").read_text()
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "0,2", "--summary-only", "--out", str(tmp_path)])
    assert "seed 2 in an unrecorded mode" in capsys.readouterr().err
