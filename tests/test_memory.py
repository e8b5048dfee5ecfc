"""Activations in the autocast dtype (model.LayerNorm, the text stream), partial gradient checkpointing, and
benchmark.py's GPU memory estimate on fake tensors: CUDA's autocast rules emulated on the CPU agree with the genuine
CUDA forward, the live-tensor tally counts what it should, and the paper's batch fits the goal."""
import pytest
import torch

import benchmark
import train_clip
from model import CLIP, CLIPConfig, LayerNorm, checkpointed_blocks, clip_loss, grad_checkpointing_value


def tiny_batch(n=4, cfg=CLIPConfig.tiny()):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg.vocab_size - 3, (n, cfg.context_length), generator=g)
    tokens[:, 10] = cfg.vocab_size - 1  # EOT
    return torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g), tokens


def test_layer_norm_keeps_its_input_dtype_and_is_nn_layer_norm_in_fp32():
    ours, ref = LayerNorm(16), torch.nn.LayerNorm(16)
    ours.weight.data.normal_(), ours.bias.data.normal_()
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 5, 16)
    assert torch.equal(ours(x), ref(x))  # fp32: bit for bit
    with benchmark.cuda_autocast_rules(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ref(x.bfloat16()).dtype == torch.float32  # CUDA's rule: layer_norm computes and returns fp32
        assert ours(x.bfloat16()).dtype == torch.bfloat16  # ... cast back, as open_clip's LayerNorm does


@pytest.mark.parametrize("cuda_rules", [False, True])
def test_residual_streams_are_bf16_under_autocast(cuda_rules):
    """Every block's output (the residual stream) of both towers in the autocast dtype; fp32 without autocast."""
    model = CLIP(CLIPConfig.tiny())
    dtypes = {}
    for name, block in model.named_modules():
        if name.endswith(tuple(f"resblocks.{i}" for i in range(2))):
            block.register_forward_hook(lambda m, i, o, name=name: dtypes.__setitem__(name, o.dtype))
    images, tokens = tiny_batch()
    model(images, tokens)
    assert set(dtypes.values()) == {torch.float32} and len(dtypes) == 4
    rules = benchmark.cuda_autocast_rules() if cuda_rules else torch.autocast("cpu", enabled=False)
    with rules, torch.autocast("cpu", dtype=torch.bfloat16):
        model(images, tokens)
    assert set(dtypes.values()) == {torch.bfloat16}


def test_bf16_forward_is_close_to_fp32():
    """ViT-B/32 (random weights), bf16 autocast with CUDA's rules against fp32: every normalised feature within 0.03
    of the fp32 one (L2; measured 0.011), and the [N, N] logits (x100) within 0.5 (measured 0.15)."""
    torch.manual_seed(0)
    model = CLIP(CLIPConfig()).eval()
    images, tokens = tiny_batch(4, CLIPConfig())
    with torch.no_grad():
        fp32 = model(images, tokens)
        with benchmark.cuda_autocast_rules(), torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(images, tokens)
    for a, b in zip(fp32[:2], bf16[:2]):
        assert b.dtype == torch.float32  # F.normalize's norm runs in fp32 (CUDA's rule for linalg_vector_norm)
        assert (a - b).norm(dim=-1).max() < 0.03
    logits = [f[2] * f[0] @ f[1].T for f in (fp32, bf16)]
    assert (logits[0] - logits[1]).abs().max() < 0.5


@pytest.mark.parametrize("spec, blocks", [(False, "----"), (True, "xxxx"), ("1", "xxxx"), ("0", "----"),
                                          (0.5, "xx--"), ("0.25", "x---"), ("every:2", "x-x-"), ("every:3", "x--x"),
                                          ("every:1", "xxxx")])
def test_checkpointed_blocks(spec, blocks):
    assert "".join("x" if c else "-" for c in checkpointed_blocks(spec, 4)) == blocks


def test_grad_checkpointing_flag_takes_all_some_or_none(capsys):
    p = train_clip.get_parser()
    base = ["--data", "a.csv", "--out", "o"]
    assert p.parse_args(base).grad_checkpointing is False
    assert p.parse_args(base + ["--grad-checkpointing"]).grad_checkpointing is True  # the old bare flag: all
    assert p.parse_args(base + ["--grad-checkpointing", "0.5"]).grad_checkpointing == 0.5
    assert p.parse_args(base + ["--grad-checkpointing", "every:3"]).grad_checkpointing == "every:3"
    assert p.parse_args(base + ["--grad-checkpointing", "1"]).grad_checkpointing is True
    for bad in ("1.5", "every:0", "half"):
        with pytest.raises(SystemExit):
            p.parse_args(base + ["--grad-checkpointing", bad])
        assert "--grad-checkpointing takes 1" in capsys.readouterr().err
    assert grad_checkpointing_value(True) is True and CLIP(CLIPConfig.tiny(grad_checkpointing="every:2"))


@pytest.mark.parametrize("spec", [0.5, "every:2"])
def test_partial_checkpointing_gives_the_same_gradients(spec):
    model = CLIP(CLIPConfig.tiny(vision_layers=4, text_layers=4))
    images, tokens = tiny_batch()
    grads = []
    for ckpt in (False, spec):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        clip_loss(*model(images, tokens)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert model.transformer.checkpointed == checkpointed_blocks(spec, 4) and any(model.transformer.checkpointed)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-7, rtol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------ the memory estimate

def test_cuda_autocast_rules_match_the_genuine_cuda_forward():
    """Module by module, the output dtypes under the emulation equal those of torch's own CUDA autocast kernels
    (fake CUDA tensors); without the emulation, CPU autocast differs (layer_norm stays bf16, normalize too)."""
    n, differ = benchmark.check_cuda_autocast_rules("tiny")
    assert n > 60 and differ == []
    plain_cpu = benchmark._module_output_dtypes("tiny", "cpu", 2, plain_layer_norm=True)
    with benchmark.cuda_autocast_rules():
        emulated = benchmark._module_output_dtypes("tiny", "cpu", 2, plain_layer_norm=True)
    assert plain_cpu["visual.ln_pre"] == [torch.bfloat16] and emulated["visual.ln_pre"] == [torch.float32]
    assert plain_cpu["CLIP"][0] == torch.bfloat16 and emulated["CLIP"][0] == torch.float32  # F.normalize


def test_live_tensor_memory_counts_storages_once_and_frees_them():
    with benchmark.FakeTensorMode(), benchmark.LiveTensorMemory() as memory:
        a = torch.zeros(1024, 256)  # 1 MiB
        view = a[:10].t()  # shares a's storage
        b = a.bfloat16()  # a new 0.5 MiB
        assert memory.live == 1.5 * 2 ** 20
        del a
        assert memory.live == 1.5 * 2 ** 20  # the view keeps the storage alive
        del view
        assert memory.live == 0.5 * 2 ** 20 and memory.peak == 1.5 * 2 ** 20
        w = torch.zeros(256, 256, requires_grad=True)
        y = (b.float() @ w).relu()  # relu's output and the matmul's inputs are saved for backward
        y.sum().backward()
        assert memory.live == b.nbytes + w.nbytes + w.grad.nbytes + y.nbytes
    assert memory.peak > memory.live


def test_paper_batch_fits_the_goal_on_fake_tensors():
    """The issue-16 goal: one step at 5,120 pairs per GPU, 6 ranks, every block checkpointed, <= 30 GiB of live
    tensors under CUDA's bf16 autocast rules (34.7 GiB before: fp32 LayerNorm outputs, an fp32 text stream and the
    float images kept through backward). Checkpointing half the blocks costs far more, as the benchmark says."""
    full = benchmark.gpu_step_memory("ViT-B-32", 5120, 6, True)
    assert full["peak"] <= 30 and 1.6 < full["fixed"] < 1.8  # 151M fp32 weights + 2 AdamW moments: 1.69 GiB
    half = benchmark.gpu_step_memory("ViT-B-32", 5120, 6, 0.5)["peak"]
    assert half > full["peak"] + 50


def test_gpu_step_memory_grows_with_batch_and_world():
    one = benchmark.gpu_step_memory("tiny", 1024, 1, False)["peak"]
    assert benchmark.gpu_step_memory("tiny", 2048, 1, False)["peak"] > 1.8 * one
    # the loss's [b, world * b] logits block: at world 8, one fp32 [1024, 8192] buffer is 28 MiB more than at 1
    assert benchmark.gpu_step_memory("tiny", 1024, 8, False)["peak"] > one + 7 * 1024 * 1024 * 4 / 2 ** 30
