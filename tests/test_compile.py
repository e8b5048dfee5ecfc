"""--compile on the CPU (inductor; needs a C compiler): the model and the device augmentation compile without graph
breaks, and the compiled DDP step (torch.compile around DDP, as train_clip.wrap_model does it) gives the eager DDP
step's loss and gradients on 2 gloo ranks, with every block checkpointed, with and without the gradient cache.
The torchrun test compiles a tiny CLIP four times over (about 4 minutes on 2 cores, faster once inductor's cache
is warm)."""
import os
import subprocess
import sys

import pytest
import torch

import data
from model import CLIP, CLIPConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_inputs(n=4):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 598, (n, CLIPConfig.tiny().context_length), generator=g)
    tokens[:, 20] = 599  # EOT
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    params = torch.stack([data.draw_photometric_params(g) for _ in range(n)])
    return images, params, tokens


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_and_augmentation_compile_without_graph_breaks(precision):
    """One graph each: a break would hand part of the step back to Python (and, inside DDP's compiled forward, cut
    the bucket split). Under autocast the text stream's cast to the autocast dtype must not break the graph."""
    images, params, tokens = tiny_inputs()
    model = CLIP(CLIPConfig.tiny(vocab_size=600, grad_checkpointing=True))
    x = data.device_transform(images, params)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        explained = torch._dynamo.explain(model)(x, tokens)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    explained = torch._dynamo.explain(data.device_transform)(images, params)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compiled_ddp_step_equals_eager_ddp_step(tmp_path):
    """Loss and raw gradients of one step, compiled against eager, on each of 2 ranks' shares of a batch of 8: equal
    to 5e-5 of each tensor's largest gradient (inductor reorders float sums; measured 5e-6 at most), with every
    block checkpointed, for --accum-steps 1 and 2. The compiled step is several graphs, split at DDP's buckets
    (the overlap): one graph would mean the all-reduce waits for the whole backward."""
    out = tmp_path / "compiled.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "_compiled_ddp.py"), str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=1200, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = torch.load(out)
    for accum in (1, 2):
        eager, compiled = runs[False, accum], runs[True, accum]
        assert eager["graphs"] == 0 and compiled["graphs"] >= 2, (accum, compiled["graphs"])
        torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=1e-5, atol=0)
        for name, g in eager["grads"].items():
            assert g.abs().max() > 0, name
            assert (compiled["grads"][name] - g).abs().max() <= 5e-5 * g.abs().max(), (accum, name)
    # and the gradient cache agrees with one chunk (the eager comparison train_clip's own tests make, compiled)
    for name, g in runs[True, 1]["grads"].items():
        assert (runs[True, 2]["grads"][name] - g).abs().max() <= 5e-5 * g.abs().max(), name
