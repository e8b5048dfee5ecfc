"""Speed and memory measurements quoted in the README. One subcommand per benchmark:

  python benchmark.py model     # ViT-B/32 CLIP training step, ours vs open_clip (fp32 and bf16), and its peak memory
  python benchmark.py loss      # clip_loss vs the textbook two-matrix InfoNCE: peak memory and time at batch 4,096
  python benchmark.py data      # image-text pipeline: samples/s per CPU core, ours vs plain PIL + torchvision
  python benchmark.py loader    # stage-2 loader alone at 5,120 per rank: peak host memory (processes + /dev/shm)
  python benchmark.py stall     # the loader feeding a simulated step (a sleep): the fraction of time it waits for data
  python benchmark.py mixing    # shards per rank batch at the paper's scale (a simulation of the sample order)
  python benchmark.py memory    # GPU memory of a step without a GPU (fake tensors): which checkpointing fits which
                                # card, the largest batch per card; activation memory per sample on this CPU
  python benchmark.py gpu       # one GPU: model-only and end-to-end pairs/s, MFU, memory, data wait (~10 min)

Each prints a Markdown table. Timings on a shared machine are noisy: `data` interleaves the two pipelines round by
round and reports medians, so both see the same machine.
"""
import argparse
import contextlib
import functools
import gc
import io
import math
import multiprocessing as mp
import os
import statistics
import tarfile
import tempfile
import time
import weakref
from collections import Counter
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import data
import model as model_module
from model import (CLIP, CLIPConfig, Dist, HelpFormatter, adamw, clip_loss, grad_checkpointing_value, preset_config,
                   preset_name)

# --------------------------------------------------------------------------------------------- shared helpers


def _proc_status_mb(key):
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0]) / 1024  # kB


def _reset_peak():
    """Reset the peak-RSS counter (VmHWM) so set-up does not count; returns the resident MB at this point."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_mb("VmRSS")


def _in_child(fn, *args):
    """Run fn(*args, queue) in a fresh process (its own peak RSS) and return what it puts in the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def _table(header, rows):
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")

# --------------------------------------------------------------------------------------------- model step


def _fake_batch(batch, device="cpu", cfg=CLIPConfig()):
    """Random float images and token rows of a config's shapes (ViT-B/32's: 224 px, 77 tokens)."""
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    tokens = torch.randint(1, cfg.vocab_size - 3, (batch, cfg.context_length), device=device)
    tokens[:, 0], tokens[:, cfg.context_length // 2] = cfg.vocab_size - 2, cfg.vocab_size - 1  # SOT ... EOT
    return images, tokens


def _step_child(impl, batch, precision, ckpt, steps, queue):
    """Forward + backward + AdamW step in a fresh process (its own threads, allocator and peak counter)."""
    torch.manual_seed(0)
    if impl == "ours":
        model, loss_fn = CLIP(CLIPConfig(grad_checkpointing=ckpt)), clip_loss
    else:
        import open_clip
        model, loss_fn = open_clip.create_model("ViT-B-32"), open_clip.ClipLoss()
        model.set_grad_checkpointing(ckpt)
    opt = adamw(model, lr=1e-4)
    images, tokens = _fake_batch(batch)
    times, resident = [], None
    for i in range(steps + 1):  # step 0 allocates gradients and AdamW moments and warms up: not timed
        if i == 1:
            resident = _reset_peak()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(*model(images, tokens))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        times.append(time.perf_counter() - t0)
    queue.put(dict(step_s=statistics.median(times[1:]), peak=_proc_status_mb("VmHWM") - resident))


def bench_model(args):
    """The same ViT-B/32 CLIP training step, our model.py against open_clip's ViT-B-32, interleaved per round."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # RSS tracks live tensors (see bench_memory)
    rows = []
    for precision in ("fp32", "bf16"):
        runs = {impl: [_in_child(_step_child, impl, args.batch, precision, False, args.steps)["step_s"]
                       for _ in range(args.rounds)] for impl in ("ours", "open_clip")}
        for impl, t in runs.items():
            rows.append((impl, precision, args.batch, f"{min(t):.2f} s", f"{args.batch / min(t):.1f}"))
            print(*rows[-1], flush=True)
    print(f"\n{torch.get_num_threads()} threads; best of {args.rounds} processes x {args.steps} timed steps (median)")
    _table(["model", "CPU autocast", "batch", "step time (fwd+bwd+AdamW)", "pairs/s"], rows)
    mem = []
    for ckpt in (False, True):
        r = _in_child(_step_child, "ours", args.mem_batch, "fp32", ckpt, 1)
        mem.append(("on" if ckpt else "off", args.mem_batch, f"{r['peak']:.0f} MB"))
    _table(["grad checkpointing", "batch", "step peak above weights + grads + AdamW state (fp32)"], mem)

# --------------------------------------------------------------------------------------------- clip_loss memory


def naive_clip_loss(image_features, text_features, logit_scale):
    """The textbook InfoNCE: two logits matrices, two cross-entropies (autograd keeps a softmax of each)."""
    labels = torch.arange(image_features.shape[0])
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _loss_child(name, n, queue):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n, 512, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, 512, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    resident = _reset_peak()
    t0 = time.perf_counter()
    loss = (clip_loss if name == "clip_loss" else naive_clip_loss)(img, txt, scale)
    loss.backward()
    queue.put(dict(peak=_proc_status_mb("VmHWM") - resident, s=time.perf_counter() - t0, loss=loss.item()))


def bench_loss(args):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    n, rows = args.loss_batch, []
    for name in ("clip_loss", "naive two-matrix"):
        r = _in_child(_loss_child, name, n)
        rows.append((name, f"{r['peak']:.0f} MB", f"{r['peak'] * 2 ** 20 / (4 * n * n):.1f}", f"{r['s']:.2f} s",
                     f"{r['loss']:.6f}"))
    _table([f"loss at batch {n:,} (fwd+bwd)", "peak above inputs", "in units of N² fp32", "time", "value"], rows)

# --------------------------------------------------------------------------------------------- data pipeline


def photo_like(w, h, rng, beta=1.65):
    """Random image with a natural-photo power spectrum (amplitude ~ 1/f^beta) and correlated colour channels:
    at JPEG quality 95 it compresses like a photo (~90 KB at 512 x 683), so decoding costs what a photo costs."""
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2)
    amp = 1 / np.maximum(f, 1 / max(w, h)) ** beta
    x = np.stack([np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((h, w)))).real for _ in range(3)], -1)
    x = x @ np.array([[1, 0.8, 0.6], [0.8, 1, 0.8], [0.6, 0.8, 1]])
    x = (x - x.mean()) / x.std() * 55 + 115
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def write_benchmark_shards(root, n_shards, per_shard, side=512, seed=0):
    """img2dataset-style shards of JPEGs whose short side is `side` (aspect ratios 1, 4:3, 3:4, 3:2)."""
    rng = np.random.default_rng(seed)
    sizes = [(side, side), (side * 4 // 3, side), (side, side * 4 // 3), (side * 3 // 2, side)]
    pool = []  # a few distinct images, reused: the decoder cannot tell
    for i in range(16):
        buf = io.BytesIO()
        photo_like(*sizes[i % 4], rng).save(buf, "JPEG", quality=95)
        pool.append(buf.getvalue())
    for s in range(n_shards):
        with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                for name, payload in ((f"{key}.jpg", pool[(s * per_shard + i) % 16]),
                                      (f"{key}.txt", f"a photo number {i} of a red dog on the grass".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return os.path.join(root, "{%05d..%05d}.tar" % (0, n_shards - 1)), np.mean([len(p) for p in pool]) / 1e3


def benchmark_data(root, n_pairs, n_shards, side):
    """Shards of >= n_pairs JPEGs (write_benchmark_shards) and a tokenizer learned from their captions:
    (pattern, mean JPEG KB, tokenizer, samples per shard)."""
    per_shard = math.ceil(n_pairs / n_shards)
    pattern, kb = write_benchmark_shards(root, n_shards, per_shard, side)
    merges = os.path.join(root, "merges.txt.gz")
    data.learn_bpe([f"a photo number {i} of a red dog on the grass" for i in range(100)], merges, 50)
    return pattern, kb, data.Tokenizer(merges), per_shard


def _plain_pipeline(shards, tokenizer, transform, batch_size):
    """The baseline: the same tar members read the same way, PIL decoding every pixel, the transform exactly as
    given (torchvision)."""
    images, captions, read = [], [], data.MemberReader()
    for path in shards:
        for _, sample in data.tar_index(path, Counter()):
            images.append(transform(Image.open(io.BytesIO(read(path, *sample["jpg"]))).convert("RGB")))
            captions.append(read(path, *sample["txt"]).decode())
            if len(images) == batch_size:
                yield dict(images=torch.stack(images), tokens=tokenizer(captions))
                images, captions = [], []
    read.close()


def bench_data(args):
    """The CPU's work per training sample: ours (shard bytes -> draft decode -> crop, resize, flip -> uint8 crop and
    photometric parameters, what a worker hands over) against the plain pipeline (PIL full decode + the whole
    train_transform per image on the CPU). The photometric part we moved to the device is timed separately."""
    torch.set_num_threads(1)  # one core: the figure is per core, as a DataLoader worker runs
    with tempfile.TemporaryDirectory() as root:
        pattern, kb, tok, _ = benchmark_data(root, args.data_samples, 2, args.side)
        n, batch = args.data_samples, 32
        shards = data.expand_shards(pattern)
        ours = data.ImageTextStreams(data.TarShards(shards), tok, args.image_size, batch, n // batch, epochs=1,
                                     streams=1, buffer_size=256)
        transform = data.train_transform(args.image_size)
        plain = lambda: _plain_pipeline(data.expand_shards(pattern), tok, transform, batch)  # noqa: E731
        rates = {"ours": [], "plain": []}
        for r in range(args.rounds + 1):  # round 0 warms up (page cache, lazy imports): not counted
            for name, make in (("ours", lambda: iter(ours)), ("plain", plain)):
                t0, count = time.perf_counter(), 0
                for b in make():
                    count += len(b["images"])
                if r:
                    rates[name].append(count / (time.perf_counter() - t0))
        device_ms = device_augment_ms(torch.device("cpu"), n=1024, image_size=args.image_size)
    print(f"{n} samples per round, {args.rounds} rounds, JPEG q95, short side {args.side} px (mean {kb:.0f} KB), "
          f"to {args.image_size} px, tokenised, batched; one thread")
    med = {k: statistics.median(v) for k, v in rates.items()}
    _table(["pipeline", "samples/s per core (median)", "range"],
           [("plain: PIL full decode + torchvision train_transform, float32 out", f"{med['plain']:.0f}",
             f"{min(rates['plain']):.0f}-{max(rates['plain']):.0f}"),
            ("ours: data.ImageTextStreams (draft decode, crop + flip, uint8 + params out)", f"{med['ours']:.0f}",
             f"{min(rates['ours']):.0f}-{max(rates['ours']):.0f}")])
    print(f"\nDevice side (data.photometric_augment + normalize, batched), on this CPU with "
          f"{torch.get_num_threads()} thread(s): {device_ms:.0f} ms per 1,024 images")
    print(f"At {med['ours']:.0f} samples/s/core, feeding 780 pairs/s/GPU (open_clip's A100 rate) takes "
          f"{780 / med['ours']:.1f} cores per GPU, and 2,000 pairs/s takes {2000 / med['ours']:.1f}.")
    print(f"speed-up {med['ours'] / med['plain']:.2f}×")

# --------------------------------------------------------------------------------------------- loader memory


def _tree_memory_gb(pid, shm_base):
    """Resident memory of a process and its descendants, shared pages divided among their users (Pss, without
    shared memory), plus what /dev/shm holds above `shm_base` (where the DataLoader's batches travel)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.endswith("kB\n")}
            total += fields.get("Pss", 0) - fields.get("Pss_Shmem", 0)
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    st = os.statvfs("/dev/shm")
    return total / 2 ** 20 + max(0, (st.f_blocks - st.f_bfree) * st.f_frsize - shm_base) / 2 ** 30


def bench_loader(args):
    """data.image_text_loader alone at the paper's per-rank batch and ViT-B/32's image size, with --workers workers:
    batches per second and the peak host memory of the whole process tree plus /dev/shm, sampled every 50 ms."""
    import threading
    with tempfile.TemporaryDirectory() as root:
        n_shards = max(2 * args.workers, 8)
        pattern, kb, tok, per_shard = benchmark_data(root, args.batch_size * (args.batches + 1), n_shards, args.side)
        st = os.statvfs("/dev/shm")
        shm_base = (st.f_blocks - st.f_bfree) * st.f_frsize
        loader = data.image_text_loader(pattern, tok, args.image_size, args.batch_size, workers=args.workers,
                                        streams=args.streams)
        peak, done = [_tree_memory_gb(os.getpid(), shm_base)], threading.Event()

        def sample():
            while not done.wait(0.05):
                peak.append(max(peak[-1], _tree_memory_gb(os.getpid(), shm_base)))

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        t0, batches = time.perf_counter(), loader.batches()
        for k in range(args.batches):
            b = next(batches)
            print(f"batch {k}: {tuple(b['images'].shape)} {b['images'].dtype} after {time.perf_counter() - t0:.0f} s, "
                  f"{peak[-1]:.2f} GB so far", flush=True)
            del b
        batches.close()
        done.set()
        watcher.join()
    print(f"\n{args.batches} batches of {args.batch_size:,} at {args.image_size} px from {n_shards} shards of "
          f"{per_shard} JPEGs (short side {args.side} px, mean {kb:.0f} KB), {loader.workers} workers, "
          f"{loader.streams} streams of {args.batch_size // loader.streams} samples a step, shuffle buffer "
          f"{data.SHUFFLE_BUFFER}; at start {peak[0]:.2f} GB")
    print(f"peak host memory {max(peak):.1f} GB")

# --------------------------------------------------------------------------------------------- loader stall


def _consume(loader, steps, step_seconds=0.0):
    """Take steps + 1 batches, sleeping step_seconds after each (the training step): (seconds until the first batch,
    seconds waited for the other `steps`, the workers' CPU seconds for those)."""
    batches = loader.batches()
    t0 = time.perf_counter()
    next(batches)  # the workers' start and the queue's first fill
    first, waited, decoded = time.perf_counter() - t0, 0.0, 0.0
    for _ in range(steps):
        time.sleep(step_seconds)
        t0 = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t0
        decoded += batch["decode_s"]
        del batch
    batches.close()
    return first, waited, decoded


def bench_stall(args):
    """The real loader on real tar shards, consumed by a simulated training step (a sleep) --step-factor times
    longer than the loader needs to make one rank batch: the fraction of the time the step waits for data. The
    loader's own pace is measured first, consuming without a step, on the same machine under the same load; the
    first batch of each run (the workers' start and the queue's first fill) is not counted."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        n_shards = max(2 * args.workers, 8)
        pattern, kb, tok, per_shard = benchmark_data(root, args.batch_size * (args.steps + 2), n_shards, args.side)
        loader = data.image_text_loader(pattern, tok, args.image_size, args.batch_size, workers=args.workers,
                                        streams=args.streams)
        _, pace, decoded = _consume(loader, args.steps)
        pace /= args.steps  # seconds the loader needs per batch, nothing else running in this process
        step = args.step_factor * pace
        first, waited, _ = _consume(loader, args.steps, step)
    total = waited + args.steps * step
    print(f"rank batch {args.batch_size:,} at {args.image_size} px from {n_shards} shards of {per_shard} JPEGs "
          f"(short side {args.side} px, mean {kb:.0f} KB), {loader.workers} workers, {loader.streams} streams; "
          f"decode {args.batch_size * args.steps / decoded:.0f} samples per worker CPU-second")
    print(f"the loader alone: {pace:.2f} s per batch; simulated step {step:.2f} s ({args.step_factor}x); first "
          f"batch after {first:.1f} s (not counted)")
    _table(["steps", "step time", "waited for data", "data wait"],
           [(args.steps, f"{step:.2f} s", f"{waited:.2f} s", f"{waited / total:.1%}")])
    print(f"\ndata wait {100 * waited / total:.1f}%")


# --------------------------------------------------------------------------------------------- batch mixing


def bench_mixing(args):
    """How many shards one rank batch spans under the defaults, by running the loader's own order (stream_pieces,
    stream_samples) on sample ids instead of images: rank 0's first `--batches` batches of epoch 0."""
    sizes = [args.shard_size] * args.shards
    streams = args.streams or data.default_streams(args.global_batch)
    data.check_streams(streams, args.global_batch, args.ranks)
    per_step, steps = args.global_batch // streams, sum(sizes) // args.global_batch
    plan = data.stream_pieces(sizes, streams, steps * per_step, seed=0, epoch=0)

    def read(piece):
        return ((piece[0], i) for i in range(piece[1], piece[2]))

    mine = range(streams // args.ranks)  # rank 0's streams
    samples = [data.stream_samples(plan, s, read, seed=0, epoch=0, buffer_size=args.buffer) for s in mine]
    rows = []
    for k in range(args.batches):
        shards = {next(samples[s])[1][0] for s in mine for _ in range(per_step)}
        rows.append((k, f"{len(shards):,}"))
    print(f"{args.shards:,} shards x {args.shard_size:,} samples, {args.ranks} ranks, global batch "
          f"{args.global_batch:,} ({args.global_batch // args.ranks:,} per rank) from {streams} streams of {per_step} "
          f"samples a step ({len(mine)} per rank), shuffle buffer "
          f"{args.buffer:,}; the order is the same for any number of workers")
    _table(["rank-0 batch", "distinct shards in it"], rows)
    print(f"\nshards per rank batch (min over {args.batches}): {min(int(r[1].replace(',', '')) for r in rows)}")


# --------------------------------------------------------------------------------------------- activation memory (CPU)


def _activation_child(batch, ckpt, precision, queue):
    """Memory of one forward+backward of ViT-B/32 CLIP above what weights, gradients and AdamW moments hold:
    `held` = what the forward pass leaves for backward (saved activations), `peak` = the step's high-water mark."""
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(grad_checkpointing=ckpt))
    opt = adamw(model, lr=1e-4)
    for p in model.parameters():  # gradients and AdamW moments exist before the measured step, as in training
        p.grad = torch.zeros_like(p)
    opt.step()
    images, tokens = _fake_batch(batch)
    resident = _reset_peak()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        image_f, text_f, scale = model(images, tokens)
    held = _proc_status_mb("VmRSS") - resident
    clip_loss(image_f, text_f, scale).backward()
    queue.put(dict(held=held, peak=_proc_status_mb("VmHWM") - resident))


def bench_cpu_activations(args):
    """Activation memory per sample on this CPU = slope over the batch size (fixed costs cancel). RSS is made to
    track live tensors: glibc is told to serve every allocation above 128 KB by mmap and to return it on free
    (otherwise freed blocks stay resident and the numbers measure the allocator's slack, not the model). CPU
    autocast is not CUDA's (it keeps layer_norm in bf16, for one), so this is no GPU figure: see bench_gpu_memory."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # read by glibc at the start of each spawned child
    b1, b2 = args.mem_batches
    rows = []
    for precision in args.mem_precisions:
        for ckpt in (False, True):
            r1, r2 = (_in_child(_activation_child, b, ckpt, precision) for b in (b1, b2))
            held, peak = ((r2[k] - r1[k]) / (b2 - b1) for k in ("held", "peak"))
            rows.append((precision, "on" if ckpt else "off", f"{held:.2f} MB", f"{peak:.2f} MB",
                         f"{r1['peak']:.0f} / {r2['peak']:.0f} MB"))
            print(*rows[-1], flush=True)
    _table(["CPU autocast", "grad checkpointing", "held for backward, per sample", "step peak, per sample",
            f"step peak above resident at batch {b1} / {b2}"], rows)

# --------------------------------------------------------------------------------------------- GPU memory, no GPU
#
# One real train_clip.train_step + AdamW step on fake tensors (shapes and dtypes, no data), with a tally of the bytes
# that live tensors hold. CUDA itself cannot be used without a device: fake CUDA tensors run the forward (under the
# genuine CUDA autocast kernels) but the autograd engine needs a CUDA context for their backward. So the step runs
# on fake CPU tensors under CPU autocast, with CUDA's policy added where the two differ: CUDA autocast runs the ops
# of ATen/autocast_mode.h's AT_FORALL_FP32 list in fp32 (layer_norm among them) and gives those of
# AT_FORALL_FP32_SET_OPT_DTYPE (sum, softmax, the norms) an fp32 output; CPU autocast leaves them alone.
# check_cuda_autocast_rules compares, module by module, the dtypes this gives with those of the genuine CUDA forward.

CUDA_FP32_OPS = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm",
    "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d",
    "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_nearest3d",
    "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
    "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa")
CUDA_FP32_OUTPUT_OPS = ("prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm",
                        "linalg_matrix_norm", "sum")
# the cards of the fit tables: memory as nvidia-smi reports it (A100 40GB: 40,960 MiB; 80 GB cards: 81,920; H200:
# 143,771 MiB)
CARDS_GIB = {"40 GB": 40.0, "80 GB": 80.0, "141 GB": 140.4}
CKPT_SETTINGS = (False, "every:3", 0.5, 0.75, True)  # of each tower's 12 blocks: none, 4, 6, 9, all


def _low_precision(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (torch.float32, torch.float64)


def _below_cpu_autocast():
    """Dispatch below CPU autocast (what CUDA's own autocast kernels do before calling the op)."""
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU))


def _fp32_kernel(op):
    """CUDA's fp32 policy: every bf16/fp16 tensor argument cast to fp32."""
    def kernel(*args, **kwargs):
        args, kwargs = torch.utils._pytree.tree_map(lambda t: t.float() if _low_precision(t) else t, (args, kwargs))
        with _below_cpu_autocast():
            return op(*args, **kwargs)
    return kernel


def _fp32_output_kernel(op, dtype_index):
    """CUDA's fp32_set_opt_dtype policy: a bf16/fp16 first argument and no dtype given -> dtype=float32."""
    def kernel(*args, **kwargs):
        given = kwargs.get("dtype") is not None or (len(args) > dtype_index and args[dtype_index] is not None)
        if _low_precision(args[0]) and not given:
            if len(args) > dtype_index:
                args = (*args[:dtype_index], torch.float32, *args[dtype_index + 1:])
            else:
                kwargs = dict(kwargs, dtype=torch.float32)
        with _below_cpu_autocast():
            return op(*args, **kwargs)
    return kernel


def _has_kernel(qualified_name, key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name, key)
    except RuntimeError:  # an overload that exists only for TorchScript
        return False


@contextlib.contextmanager
def cuda_autocast_rules():
    """CPU autocast follows CUDA's rules inside this context: a kernel is added at the AutocastCPU dispatch key for
    each overload that CUDA autocast handles and CPU autocast does not. Yields the overloads changed."""
    lib = torch.library.Library("aten", "IMPL")
    changed = []
    for names, fp32_output in ((CUDA_FP32_OPS, False), (CUDA_FP32_OUTPUT_OPS, True)):
        for name in names:
            packet = getattr(torch.ops.aten, name)
            for overload in packet.overloads():
                op = getattr(packet, overload)
                qualified = op.name()  # e.g. "aten::sum.dim_IntList"
                if not _has_kernel(qualified, "AutocastCUDA") or _has_kernel(qualified, "AutocastCPU"):
                    continue
                arguments = [a.name for a in op._schema.arguments]
                if fp32_output and "dtype" not in arguments:
                    continue
                kernel = _fp32_output_kernel(op, arguments.index("dtype")) if fp32_output else _fp32_kernel(op)
                lib.impl(qualified.split("::")[1], kernel, "AutocastCPU")
                changed.append(qualified)
    try:
        yield changed
    finally:
        lib._destroy()


class LiveTensorMemory(TorchDispatchMode):
    """Bytes held by the storages of live tensors, and their peak, over everything dispatched inside it (on fake
    tensors too). Each tensor an op returns is counted once per storage (views share their base's); a weakref
    finalizer fires when the tensor dies (autograd's saved tensors and .grad keep it alive), and a storage's bytes
    are released with its last tensor. What it cannot see: the caching allocator's rounding and fragmentation, the
    CUDA context, cuBLAS/cuDNN workspaces, NCCL's buffers."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = {}  # storage id -> [tensors alive on it, bytes]
        self.tensors = set()  # ids of the tensors counted and still alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in self.tensors:
                self._count(t)
        return out

    def _count(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.storages:
            self.storages[key] = [0, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.storages[key][0] += 1
        self.tensors.add(id(t))
        weakref.finalize(t, self._release, id(t), key)

    def _release(self, tensor_id, key):
        self.tensors.discard(tensor_id)
        entry = self.storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self.storages[key]
            self.live -= entry[1]


def _emulated_all_gather(out, x, **kwargs):
    """A gather's output filled with copies of this rank's slice (the fake process group moves no data)."""
    out.view(-1, *x.shape).copy_(x.expand(out.shape[0] // x.shape[0], *x.shape))


def _emulated_reduce_scatter(out, x, **kwargs):
    torch.sum(x.view(-1, *out.shape), dim=0, out=out)


@contextlib.contextmanager
def emulated_world(world_size):
    """Rank 0 of `world_size` ranks in this one process: a fake process group (torch's testing backend; collectives
    move nothing), so clip_loss gathers [world * b, D] text features and computes its [b, world * b] logits block,
    on the NCCL branch (reduce-scatter in backward) as on GPUs. The gathers are filled with copies of the local
    features, so that the loss stays finite."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with mock.patch.object(dist, "get_backend", return_value="nccl"), \
                mock.patch.object(dist, "all_gather_into_tensor", _emulated_all_gather), \
                mock.patch.object(dist, "reduce_scatter_tensor", _emulated_reduce_scatter):
            yield
    finally:
        dist.destroy_process_group()


def _fake_inputs(cfg, batch, uint8=True):
    """A rank batch as train_clip hands it to train_step (uint8 crops, photometric parameters, tokens), or float
    images; created inside FakeTensorMode, so only their shapes exist."""
    shape = (batch, 3, cfg.image_size, cfg.image_size)
    images = torch.zeros(shape, dtype=torch.uint8) if uint8 else torch.zeros(shape)
    params = torch.zeros(batch, data.PHOTOMETRIC_PARAMS) if uint8 else None
    return images, params, torch.zeros(batch, cfg.context_length, dtype=torch.long)


def gpu_step_memory(preset, batch, world_size, ckpt, accum_steps=1):
    """Peak GiB of live tensors in one train_clip.train_step + AdamW step under CUDA's bf16 autocast rules, for rank
    0 of world_size ranks at `batch` pairs per GPU (fake tensors: no GPU, no data). As from the second step of a
    run: AdamW's moments exist, the gradients were freed by zero_grad(set_to_none=True). The optimiser steps with
    foreach=True, the default on CUDA. Also returns `fixed` (weights and AdamW moments)."""
    import train_clip
    cfg = preset_config(preset, grad_checkpointing=ckpt)
    with cuda_autocast_rules(), emulated_world(world_size), FakeTensorMode(), LiveTensorMemory() as memory, \
            mock.patch("model.check_token_ids"):  # it reads token values, which fake tensors do not have
        model = CLIP(cfg)
        optimizer = adamw(model, lr=1e-4)
        for group in optimizer.param_groups:
            group["foreach"] = True
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        fixed = memory.live
        images, params, tokens = _fake_inputs(cfg, batch)
        memory.peak = memory.live
        train_clip.train_step(model, images, tokens, accum_steps, torch.autocast("cpu", dtype=torch.bfloat16),
                              params=params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return dict(peak=memory.peak / 2 ** 30, fixed=fixed / 2 ** 30)


def _dtype_recorder(seen, name):
    """A forward hook that writes the dtypes of a module's output tensors into seen[name]."""
    def hook(module, inputs, output):
        seen[name] = [t.dtype for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
    return hook


def _module_output_dtypes(preset, device, batch, plain_layer_norm=False):
    """{module name: dtypes of its output tensors} in a bf16 autocast forward on fake tensors on `device`;
    plain_layer_norm: with torch's nn.LayerNorm instead of ours (whose cast back would hide layer_norm's dtype)."""
    seen = {}
    layer_norm = torch.nn.LayerNorm if plain_layer_norm else model_module.LayerNorm
    with FakeTensorMode(), torch.device(device), mock.patch("model.check_token_ids"), \
            mock.patch("model.LayerNorm", layer_norm):
        model = CLIP(preset_config(preset))
        for name, module in model.named_modules():
            module.register_forward_hook(_dtype_recorder(seen, name or "CLIP"))
        images, _, tokens = _fake_inputs(model.config, batch, uint8=False)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            model(images, tokens)
    return seen


def check_cuda_autocast_rules(preset, batch=2):
    """Every module's output dtypes in a bf16 forward under cuda_autocast_rules on fake CPU tensors, against those
    under the genuine CUDA autocast on fake CUDA tensors (a forward needs no device; torch.autocast("cuda") is told
    that CUDA is there); for our model and for one with nn.LayerNorm. Returns (modules compared, those that
    differ)."""
    compared, differ = 0, []
    for plain in (False, True):
        with cuda_autocast_rules():
            emulated = _module_output_dtypes(preset, "cpu", batch, plain)
        with mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False), \
                mock.patch("torch.cuda.is_bf16_supported", return_value=True):
            genuine = _module_output_dtypes(preset, "cuda", batch, plain)
        compared += len(genuine)
        prefix = "nn.LayerNorm: " if plain else ""
        differ += [prefix + name for name in genuine if genuine[name] != emulated.get(name)]
    return compared, differ


def _largest_batch(fits, guess, step=64):
    """The largest multiple of `step` for which fits(b) holds, searched from `guess` (fits is monotone in b)."""
    b = max(step, round(guess / step) * step)
    if fits(b):
        while fits(b + step):
            b += step
        return b
    while b > step:
        b -= step
        if fits(b):
            return b
    return 0


def fit_batches(preset, world_size, ckpt, budgets_gib, extra_gib, probes=(1024, 3072, 5120)):
    """Largest per-GPU batch (multiple of 64) whose gpu_step_memory peak + extra_gib stays within each budget. The
    peak is a quadratic in b (activations ~ b, the loss's logits block ~ b x world b): fitted on three probes, then
    confirmed by runs at and around the fitted answer."""
    peaks = {b: gpu_step_memory(preset, b, world_size, ckpt)["peak"] for b in probes}
    quadratic = np.polyfit(list(peaks), list(peaks.values()), 2)

    def peak(b):
        if b not in peaks:
            peaks[b] = gpu_step_memory(preset, b, world_size, ckpt)["peak"]
        return peaks[b]

    answers = []
    for budget in budgets_gib:
        roots = [r.real for r in np.roots(quadratic - [0, 0, budget - extra_gib]) if abs(r.imag) < 1e-9 and r.real > 0]
        fits = functools.partial(_within, peak, budget - extra_gib)
        answers.append(_largest_batch(fits, min(roots, default=64)))
    return answers


def _within(peak, budget, b):
    return peak(b) <= budget


def _ckpt_name(ckpt):
    return {False: "off", True: "all blocks"}.get(ckpt, f"{ckpt} of the blocks" if isinstance(ckpt, float)
                                                  else ckpt)


def bench_gpu_memory(args):
    """The GPU memory of one training step without a GPU (gpu_step_memory), at --gpu-batch pairs per GPU and
    --world-size ranks, for each --grad-checkpointing setting; which card each fits; the largest batch per card."""
    n_compared, differ = check_cuda_autocast_rules(args.model)
    print(f"CUDA autocast rules on CPU: {n_compared - len(differ)} of {n_compared} modules give the genuine CUDA "
          f"forward's output dtypes" + (f"; differ: {', '.join(differ)}" if differ else ""))
    n_params = sum(p.numel() for p in CLIP(preset_config(args.model)).parameters())
    ddp_gib = 4 * n_params / 2 ** 30 if args.world_size > 1 else 0.0  # DDP's buckets: a copy of the fp32 gradients
    budgets = [gib * (1 - args.margin_fraction) - args.margin_gib for gib in CARDS_GIB.values()]
    rows = []
    for ckpt in args.grad_checkpointing:
        r = gpu_step_memory(args.model, args.gpu_batch, args.world_size, ckpt)
        total = r["peak"] + ddp_gib
        rows.append((_ckpt_name(ckpt), f"{r['peak']:.1f} GiB", f"{total:.1f} GiB",
                     *("yes" if total <= budget else "no" for budget in budgets)))
        print(*rows[-1], flush=True)
    b, n = args.gpu_batch, args.gpu_batch * args.world_size
    print(f"\n{args.model}, {b:,} pairs per GPU, {args.world_size} ranks (clip_loss over [{b:,} x {n:,}] logits), bf16 "
          f"autocast with CUDA's rules, train_step + AdamW (foreach) as from the second step on; of the peak, "
          f"{r['fixed']:.2f} GiB are the weights and AdamW moments. A card fits when the total stays within its "
          f"memory less {args.margin_fraction:.0%} and {args.margin_gib} GiB (CUDA context, NCCL, allocator "
          f"fragmentation).")
    _table(["grad checkpointing", "peak of live tensors", "+ DDP's gradient buckets",
            *(f"fits {card}" for card in CARDS_GIB)], rows)
    fit_rows = []
    for ckpt in args.grad_checkpointing:
        fit_rows.append((_ckpt_name(ckpt), *(f"{b:,}" for b in fit_batches(args.model, args.world_size, ckpt, budgets,
                                                                          ddp_gib))))
        print(*fit_rows[-1], flush=True)
    _table(["grad checkpointing", *(f"largest batch per GPU, {card}" for card in CARDS_GIB)], fit_rows)
    print(f"\n({args.world_size} ranks; the same margin; multiples of 64.)")


def bench_memory(args):
    if not args.skip_cpu:
        bench_cpu_activations(args)
    bench_gpu_memory(args)

# --------------------------------------------------------------------------------------------- GPU step


# Dense bf16 tensor-core peak by the exact name torch.cuda.get_device_name() reports (NVIDIA's datasheets; the
# sparsity figures halved). A name not here gets no MFU rather than a guess: pass --peak-tflops.
PEAK_BF16_TFLOPS = {
    "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0, "NVIDIA GH200 480GB": 989.0,
}


def gflops_per_pair(preset, ckpt, batch=4):
    """Measured FLOPs of the model's forward + backward per image-text pair (torch.utils.flop_counter on fake
    tensors, the attention through its math kernel so that it is counted; the loss's ~0.1 GF/pair not included).
    With checkpointing, the recomputed forwards count too: hardware FLOPs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = preset_config(preset, grad_checkpointing=ckpt)
    with FakeTensorMode(), mock.patch("model.check_token_ids"):
        model = CLIP(cfg)
        images, _, tokens = _fake_inputs(cfg, batch, uint8=False)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            image_f, text_f, _ = model(images, tokens)
            (image_f.sum() + text_f.sum()).backward()
    return counter.get_total_flops() / batch / 1e9


def _gpu_ckpt_for(preset, batch, world_size, device, margin_fraction, margin_gib):
    """The least checkpointing of CKPT_SETTINGS whose gpu_step_memory estimate fits this device (all blocks if
    none does); no checkpointing on the CPU."""
    if device.type != "cuda":
        return False
    budget = torch.cuda.get_device_properties(device).total_memory / 2 ** 30 * (1 - margin_fraction) - margin_gib
    for ckpt in CKPT_SETTINGS:
        if gpu_step_memory(preset, batch, world_size, ckpt)["peak"] <= budget:
            return ckpt
    return True


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(step, n_warmup, n_steps, device):
    """Runs step() n_warmup + n_steps times (a synchronised step each, as train_clip's loss.item() makes it);
    returns the warm-up's seconds, the timed steps' seconds and the seconds of those that step() says it waited."""
    t0 = time.perf_counter()
    for _ in range(n_warmup):
        step()
    _sync(device)
    t1, waited = time.perf_counter(), 0.0
    for _ in range(n_steps):
        waited += step()
    _sync(device)
    return t1 - t0, time.perf_counter() - t1, waited


def _model_only_step(model, optimizer, images, tokens, amp):
    """Float images already on the device, the loss over this GPU's [b, b] logits: the network alone."""
    import train_clip
    train_clip.train_step(model, images, tokens, 1, amp)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(tokens.device)
    return 0.0


def _end_to_end_step(model, optimizer, batches, device, amp):
    """What train_clip does per step on one GPU: the next rank batch from the loader (host wait), its uint8 copy to
    the device, the device augmentation, forward, the loss at the global batch's logits shape, backward, AdamW."""
    import train_clip
    t0 = time.perf_counter()
    batch = data.batch_to_device(next(batches), device)
    waited = time.perf_counter() - t0
    train_clip.train_step(model, batch["images"], batch["tokens"], 1, amp, params=batch["params"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return waited


def _memory_columns(device):
    if device.type != "cuda":
        return "-", "-"
    return (f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB",
            f"{torch.cuda.max_memory_reserved(device) / 2 ** 30:.1f} GiB")


def _gpu_row(run, device):
    """One row: a dict of the warm-up's and the timed steps' seconds, the data-wait fraction and the peak memory;
    None on OOM (the row fails, the next one runs)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        warmup_s, timed_s, waited = run()
    except (torch.OutOfMemoryError, RuntimeError) as err:  # compiled code may re-raise an OOM as a RuntimeError
        if "out of memory" not in str(err).lower():
            raise
        return None
    return dict(warmup_s=warmup_s, seconds=timed_s, wait=waited / timed_s, memory=_memory_columns(device))


def _gpu_setup(args, root, device):
    """The benchmark's tokenizer, and synthetic 256-px JPEG shards holding enough pairs for the largest batch."""
    n_pairs = max(args.batches) * (args.warmup + args.steps + 1)
    pattern, _, tokenizer, _ = benchmark_data(root, n_pairs, max(8, 2 * args.workers), args.side)
    return tokenizer, pattern, n_pairs


def _gpu_rows_for_batch(args, b, tokenizer, pattern, n_pairs, device, peak):
    """Eager and compiled rows, model-only and end-to-end, at b pairs per GPU."""
    import train_clip
    ckpt = args.grad_checkpointing
    if ckpt == "auto":
        ckpt = _gpu_ckpt_for(args.model, b, args.world_size, device, args.margin_fraction, args.margin_gib)
    model_gf, hardware_gf = gflops_per_pair(args.model, False), gflops_per_pair(args.model, ckpt)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    rows = []
    for mode in args.modes:
        torch.manual_seed(0)
        torch._dynamo.reset()  # each batch size compiles its own static graphs, as in a run
        raw = CLIP(preset_config(args.model, grad_checkpointing=ckpt)).to(device)
        optimizer = adamw(raw, lr=1e-5)
        model = train_clip.wrap_model(raw, Dist(device=device), compile=mode == "compiled")
        images, tokens = _fake_batch(b, device, raw.config)
        model_only = functools.partial(_model_only_step, model, optimizer, images, tokens, amp)
        results = [("model only", _gpu_row(functools.partial(_timed_steps, model_only, args.warmup, args.steps,
                                                             device), device))]
        optimizer.zero_grad(set_to_none=True)  # after an OOM the next row starts from the same memory
        del images, tokens, model_only
        loader = data.image_text_loader(pattern, tokenizer, raw.config.image_size, b, workers=args.workers,
                                        samples_per_epoch=n_pairs, pin_memory=device.type == "cuda",
                                        context_length=raw.config.context_length)
        with emulated_world(args.world_size):
            end_to_end = functools.partial(_end_to_end_step, model, optimizer, loader.batches(), device, amp)
            results.append(("end to end", _gpu_row(functools.partial(_timed_steps, end_to_end, args.warmup,
                                                                     args.steps, device), device)))
        for what, r in results:
            rows.append(_gpu_table_row(b, ckpt, mode, what, r, model_gf, hardware_gf, peak, args.steps))
            print(*rows[-1], flush=True)
        del model, raw, optimizer, loader, end_to_end
        gc.collect()
    return rows


def _gpu_table_row(b, ckpt, mode, what, r, model_gf, hardware_gf, peak, steps):
    head = (f"{b:,}", _ckpt_name(ckpt), f"{hardware_gf:.3g}", mode, what)
    if r is None:
        return (*head, "OOM", "", "", "", "", "", "")
    rate = b * steps / r["seconds"]
    mfu = f"{rate * model_gf / 1e3 / peak:.1%}" if peak else "?"
    hfu = f"{rate * hardware_gf / 1e3 / peak:.1%}" if peak else "?"
    wait = f"{r['wait']:.1%}" if what == "end to end" else "-"  # the model-only rows have no data to wait for
    return (*head, f"{rate:,.0f}", mfu, hfu, wait, *r["memory"], f"{r['warmup_s']:.0f} s")


def bench_gpu(args):
    """ViT-B/32 training steps on one GPU (bf16 autocast), per --batches size and --modes: model-only (the network
    on float images already on the device) and end-to-end (the real loader, its uint8 copy, the device augmentation,
    the loss at the global batch's logits shape for --world-size ranks); MFU from measured FLOPs."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "none"))
    if device.type == "none":
        print("no CUDA device: the GPU benchmark was not run (--device cpu runs it on the CPU, e.g. --model tiny)")
        return
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train_clip sets it
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or PEAK_BF16_TFLOPS.get(name)
    if not peak:
        print(f"peak bf16 TFLOPs unknown for {name!r}: no MFU/HFU (pass --peak-tflops)")
    t0, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as root:
        tokenizer, pattern, n_pairs = _gpu_setup(args, root, device)
        for b in args.batches:
            rows += _gpu_rows_for_batch(args, b, tokenizer, pattern, n_pairs, device, peak)
    model_gf = gflops_per_pair(args.model, False)
    print(f"\n{name}; {args.model}; bf16 autocast; {args.steps} timed steps after {args.warmup} warm-up steps; "
          f"{args.workers} loader workers on {args.side}-px JPEG shards; end to end: the loss over [b, "
          f"{args.world_size} b] logits (rank 0 of {args.world_size}; no all-reduce on one GPU); MFU at "
          f"{model_gf:.3g} GF/pair (forward + backward, measured), HFU at the hardware GF/pair of the row (the "
          f"checkpointed blocks' forward twice)"
          f"{f'; peak {peak:.0f} TFLOPs' if peak else ''}; {time.perf_counter() - t0:.0f} s in all")
    _table(["batch/GPU", "grad ckpt", "hardware GF/pair", "mode", "what", "pairs/s/GPU", "MFU", "HFU", "data wait",
            "peak allocated", "peak reserved", "compile + warm-up"], rows)


def _ckpt_setting(text):
    """--grad-checkpointing's values here: model.grad_checkpointing_value's, and `auto` for `gpu`."""
    return "auto" if text == "auto" else grad_checkpointing_value(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    fmt = dict(formatter_class=HelpFormatter)
    mo = sub.add_parser("model", help="ViT-B/32 training step, ours vs open_clip", **fmt)
    mo.add_argument("--batch", type=int, default=8, help="pairs per timed step")
    mo.add_argument("--steps", type=int, default=2, help="timed steps per process (after one untimed)")
    mo.add_argument("--rounds", type=int, default=2, help="fresh processes per configuration (best is reported)")
    mo.add_argument("--mem-batch", type=int, default=32, help="batch of the peak-memory measurement")
    lo = sub.add_parser("loss", help="clip_loss vs naive InfoNCE, memory and time", **fmt)
    lo.add_argument("--loss-batch", type=int, default=4096, help="pairs N (the logits are N x N)")
    d = sub.add_parser("data", help="image-text data pipeline, samples/s per CPU core", **fmt)
    d.add_argument("--data-samples", type=int, default=512, help="samples per round")
    d.add_argument("--rounds", type=int, default=5, help="timed rounds per pipeline, interleaved (median reported)")
    d.add_argument("--side", type=int, default=512, help="short side of the JPEGs in the shards")
    d.add_argument("--image-size", type=int, default=224, help="crop size the pipelines produce")
    lo2 = sub.add_parser("loader", help="stage-2 loader alone: peak host memory at the per-rank batch", **fmt)
    lo2.add_argument("--batch-size", type=int, default=5120, help="per-rank batch")
    lo2.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    lo2.add_argument("--streams", type=int, default=80,
                     help="streams of this rank (the paper's: 480 streams shared by 6 ranks, 64 samples a step each)")
    lo2.add_argument("--batches", type=int, default=3, help="rank batches to read")
    lo2.add_argument("--side", type=int, default=512, help="short side of the JPEGs in the shards")
    lo2.add_argument("--image-size", type=int, default=224, help="crop size")
    st = sub.add_parser("stall", help="the loader feeding a simulated step: the fraction of time spent waiting", **fmt)
    st.add_argument("--batch-size", type=int, default=5120, help="per-rank batch")
    st.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    st.add_argument("--streams", type=int, default=None, help="--data-streams (default: gcd(batch, 480))")
    st.add_argument("--steps", type=int, default=5, help="simulated steps measured (after the first batch)")
    st.add_argument("--step-factor", type=float, default=1.3,
                    help="the simulated step's length over the loader's own time per batch")
    st.add_argument("--side", type=int, default=256, help="short side of the JPEGs in the shards")
    st.add_argument("--image-size", type=int, default=224, help="crop size")
    mx = sub.add_parser("mixing", help="shards per rank batch at the paper's scale (the loader's own order)", **fmt)
    mx.add_argument("--shards", type=int, default=1500, help="tar shards in the dataset")
    mx.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    mx.add_argument("--ranks", type=int, default=6, help="data-parallel ranks")
    mx.add_argument("--global-batch", type=int, default=30720, help="pairs per optimiser step over all ranks")
    mx.add_argument("--streams", type=int, default=None, help="--data-streams (default: gcd(global batch, 480))")
    mx.add_argument("--buffer", type=int, default=data.SHUFFLE_BUFFER, help="shuffle buffer per stream")
    mx.add_argument("--batches", type=int, default=5, help="rank-0 batches to inspect")
    m = sub.add_parser("memory", help="GPU memory of a training step without a GPU (fake tensors, CUDA autocast "
                                      "rules): which checkpointing fits which card; activation memory on this CPU",
                       **fmt)
    m.add_argument("--model", type=preset_name, default="ViT-B-32", help="architecture preset (model.py)")
    m.add_argument("--gpu-batch", type=int, default=5120, help="pairs per GPU of the estimate (the paper's 5,120)")
    m.add_argument("--world-size", type=int, default=6,
                   help="ranks: the loss's logits are [batch, world x batch] (the paper's 6 GPUs)")
    m.add_argument("--grad-checkpointing", type=grad_checkpointing_value, nargs="+", default=list(CKPT_SETTINGS),
                   help="settings to estimate, as train_clip.py's --grad-checkpointing takes them (0, 1, a fraction, "
                        "every:K)")
    m.add_argument("--margin-gib", type=float, default=3.0,
                   help="GiB of each card kept free for the CUDA context, NCCL and workspaces")
    m.add_argument("--margin-fraction", type=float, default=0.10,
                   help="and this fraction of it, for the caching allocator's fragmentation")
    m.add_argument("--skip-cpu", action="store_true", help="skip the (slow) activation measurement on this CPU")
    m.add_argument("--mem-batches", type=int, nargs=2, default=[16, 48],
                   help="CPU measurement: the two batches whose difference gives the per-sample memory")
    m.add_argument("--mem-precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="CPU measurement: autocast settings")
    g = sub.add_parser("gpu", help="training step on one GPU: model-only and end-to-end pairs/s, MFU, memory, data "
                                   "wait (about 10 minutes)", **fmt)
    g.add_argument("--batches", type=int, nargs="+", default=[1024, 5120], help="pairs per GPU, one set of rows each")
    g.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                   help="eager, and/or torch.compile as train_clip.py --compile does it")
    g.add_argument("--grad-checkpointing", type=_ckpt_setting, default="auto",
                   help="auto: the least of the `memory` settings that the estimate fits into this GPU; or a value "
                        "as train_clip.py takes it")
    g.add_argument("--world-size", type=int, default=6,
                   help="end to end: the loss at the logits shape of this many ranks' global batch")
    g.add_argument("--steps", type=int, default=8, help="timed steps per row")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps per row first (allocation, compilation)")
    g.add_argument("--workers", type=int, default=min(16, max(1, (os.cpu_count() or 2) - 2)),
                   help="end to end: loader workers (0: decode in the main process); default: the cores but two")
    g.add_argument("--side", type=int, default=256, help="end to end: short side of the synthetic JPEG shards")
    g.add_argument("--model", type=preset_name, default="ViT-B-32", help="architecture preset (tiny: the CPU test)")
    g.add_argument("--device", default=None, help="default cuda when there is one; cpu runs it here (slowly)")
    g.add_argument("--margin-gib", type=float, default=3.0, help="auto checkpointing: GiB of the GPU kept free")
    g.add_argument("--margin-fraction", type=float, default=0.10, help="auto checkpointing: and this fraction")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU (default: from the exact GPU name, see PEAK_BF16_TFLOPS)")
    args = p.parse_args(argv)
    {"model": bench_model, "loss": bench_loss, "data": bench_data, "loader": bench_loader, "stall": bench_stall,
     "mixing": bench_mixing, "memory": bench_memory, "gpu": bench_gpu}[args.what](args)


def device_augment_ms(device, n=1024, image_size=224, repeats=3):
    """Milliseconds for data.photometric_augment + data.normalize on n uint8 crops on `device` (best of `repeats`,
    after one warm-up call): the training device's share of train_transform when the loader ships uint8 crops."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g).to(device)
    params = torch.stack([data.draw_photometric_params(g) for _ in range(n)]).to(device)
    times = []
    for _ in range(repeats + 1):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = data.normalize(data.photometric_augment(images, params))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        del out
    return 1000 * min(times[1:])


if __name__ == "__main__":
    main()
