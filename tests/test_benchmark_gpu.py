"""`python benchmark.py gpu` in its tiny configuration on the CPU: the same code as on a GPU (the real loader on
synthetic shards it writes, uint8 batches, the device augmentation, the loss at the emulated global batch's logits
shape, eager and compiled), so it cannot break unseen. An OOM fails its own row only."""
import re

import torch

import benchmark

TINY = ["gpu", "--device", "cpu", "--model", "tiny", "--steps", "2", "--warmup", "1", "--world-size", "2"]


def table_rows(out):
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if re.match(r"\| [\d,]+ \|", line)]


def test_gpu_benchmark_runs_tiny_on_cpu_and_survives_an_oom(capsys, monkeypatch):
    real = benchmark._model_only_step

    def oom_at_16(model, optimizer, images, tokens, amp):
        if len(images) == 16:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, optimizer, images, tokens, amp)

    monkeypatch.setattr(benchmark, "_model_only_step", oom_at_16)
    benchmark.main(TINY + ["--batches", "8", "16", "--modes", "eager", "--workers", "1", "--peak-tflops", "1",
                           "--grad-checkpointing", "0.5"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [(r[0], r[3], r[4]) for r in rows] == [("8", "eager", "model only"), ("8", "eager", "end to end"),
                                                  ("16", "eager", "model only"), ("16", "eager", "end to end")]
    assert rows[2][5] == "OOM" and float(rows[3][5].replace(",", "")) > 0  # the next row still ran
    for r in (rows[0], rows[1], rows[3]):
        assert float(r[5].replace(",", "")) > 0 and r[6].endswith("%") and r[7].endswith("%")  # pairs/s, MFU, HFU
        assert float(r[2]) > benchmark.gflops_per_pair("tiny", False)  # checkpointing half the blocks: recompute
    assert rows[0][8] == "-" and float(rows[1][8].rstrip("%")) >= 0 and "MFU at" in out  # data wait


def test_gpu_benchmark_compiled_rows_on_cpu(capsys):
    benchmark.main(TINY + ["--batches", "8", "--modes", "compiled", "--workers", "0"])
    rows = table_rows(capsys.readouterr().out)
    assert [(r[3], r[4]) for r in rows] == [("compiled", "model only"), ("compiled", "end to end")]
    assert all(float(r[5].replace(",", "")) > 0 and r[6] == "?" for r in rows)  # no peak TFLOPs for a CPU: no MFU


def test_peak_tflops_by_exact_name_only():
    assert benchmark.PEAK_BF16_TFLOPS["NVIDIA H100 PCIe"] == 756 and benchmark.PEAK_BF16_TFLOPS["NVIDIA H200"] == 989
    assert "NVIDIA H100" not in benchmark.PEAK_BF16_TFLOPS  # a name is looked up whole, never by substring
