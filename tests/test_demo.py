"""The README's demo, at its --quick size: every stage runs on the synthetic world and writes what the next needs."""
import json

import demo


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    demo.main(["--quick", "--out", str(out)])
    for ckpt in ("nights/nights.pt", "pi/epoch_1.pt", "baseline/epoch_1.pt", "qkv/finetuned.pt"):
        assert (out / ckpt).stat().st_size > 0, ckpt
    res = json.loads((out / "eval_pi_vs_baseline" / "results.json").read_text())
    assert res["ours"]["checkpoint"].endswith("pi/epoch_1.pt")
    assert res["base"]["checkpoint"].endswith("baseline/epoch_1.pt")
    comparison = res["comparison"]
    assert set(comparison["synthetic"]["zeroshot"]) == {"shape", "colour", "count"}
    assert {"i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"} <= set(comparison["synthetic"]["retrieval"])
    assert {"val", "test_imagenet", "test_no_imagenet"} <= set(comparison["nights"])
    for v in comparison["nights"].values():  # Δ is ours - base, in percentage points
        assert abs(v["delta"] - (v["ours"] - v["base"])) < 1e-9
    report = (out / "eval_pi_vs_baseline" / "report.md").read_text()
    for row in ("shape top1", "colour top1", "count top1", "retrieval i2t_r1", "| val |", "| test_imagenet |"):
        assert row in report, row
    printed = capsys.readouterr().out
    for model in ("| baseline |", "| PI |", "| human-later (QKV) |"):  # the 2AFC table of all three models
        assert model in printed
