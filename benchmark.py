"""Speed and memory measurements quoted in the README. One subcommand per benchmark:

  python benchmark.py model     # ViT-B/32 CLIP training step, ours vs open_clip (fp32 and bf16), and its peak memory
  python benchmark.py loss      # clip_loss vs the textbook two-matrix InfoNCE: peak memory and time at batch 4,096
  python benchmark.py data      # image-text pipeline: samples/s per CPU core, ours vs plain PIL + torchvision
  python benchmark.py loader    # stage-2 loader alone at 5,120 per rank: peak host memory (processes + /dev/shm)
  python benchmark.py stall     # the loader feeding a simulated step (a sleep): the fraction of time it waits for data
  python benchmark.py mixing    # shards per rank batch at the paper's scale (a simulation of the sample order)
  python benchmark.py memory    # activation memory per sample, with and without gradient checkpointing (CPU)
  python benchmark.py gpu       # CUDA only: samples/s/GPU, peak memory and MFU of a ViT-B/32 training step

Each prints a Markdown table. Timings on a shared machine are noisy: `data` interleaves the two pipelines round by
round and reports medians, so both see the same machine.
"""
import argparse
import io
import math
import multiprocessing as mp
import os
import statistics
import tarfile
import tempfile
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
from model import CLIP, CLIPConfig, adamw, clip_loss

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


def _fake_batch(batch, device="cpu"):
    images = torch.randn(batch, 3, 224, 224, device=device)
    tokens = torch.randint(1, 49405, (batch, 77), device=device)
    tokens[:, 0], tokens[:, 40] = 49406, 49407  # SOT ... EOT, as the tokenizer writes them
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


def _plain_pipeline(shards, tokenizer, transform, batch_size):
    """The baseline: the same tar stream, PIL decoding every pixel, the transform exactly as given (torchvision)."""
    images, captions, bad = [], [], Counter()
    for path in shards:
        for sample in data.tar_samples(path, bad):
            images.append(transform(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
            captions.append(sample["txt"].decode())
            if len(images) == batch_size:
                yield dict(images=torch.stack(images), tokens=tokenizer(captions))
                images, captions = [], []


def bench_data(args):
    """The CPU's work per training sample: ours (shard bytes -> draft decode -> crop, resize, flip -> uint8 crop and
    photometric parameters, what a worker hands over) against the plain pipeline (PIL full decode + the whole
    train_transform per image on the CPU). The photometric part we moved to the device is timed separately."""
    torch.set_num_threads(1)  # one core: the figure is per core, as a DataLoader worker runs
    with tempfile.TemporaryDirectory() as root:
        pattern, kb = write_benchmark_shards(root, 2, args.data_samples // 2, args.side)
        merges = os.path.join(root, "merges.txt.gz")
        data.learn_bpe([f"a photo number {i} of a red dog on the grass" for i in range(100)], merges, 50)
        tok = data.Tokenizer(merges)
        n, batch = args.data_samples, 32
        shards = data.expand_shards(pattern)
        ours = data.TarImageText(shards, data.shard_sizes(shards), tok, args.image_size, batch, n // batch, epochs=1,
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
            ("ours: data.TarImageText (draft decode, crop + flip, uint8 + params out)", f"{med['ours']:.0f}",
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
        per_shard = math.ceil(args.batch_size * (args.batches + 1) / n_shards)
        pattern, kb = write_benchmark_shards(root, n_shards, per_shard, args.side)
        merges = os.path.join(root, "merges.txt.gz")
        data.learn_bpe([f"a photo number {i} of a red dog on the grass" for i in range(100)], merges, 50)
        tok = data.Tokenizer(merges)
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
        per_shard = math.ceil(args.batch_size * (args.steps + 2) / n_shards)
        pattern, kb = write_benchmark_shards(root, n_shards, per_shard, args.side)
        merges = os.path.join(root, "merges.txt.gz")
        data.learn_bpe([f"a photo number {i} of a red dog on the grass" for i in range(100)], merges, 50)
        tok = data.Tokenizer(merges)
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
    samples = [data.stream_samples(plan[s], read, 0, 0, s, args.shards_per_stream, args.buffer) for s in mine]
    rows = []
    for k in range(args.batches):
        shards = {next(samples[s])[1][0] for s in mine for _ in range(per_step)}
        rows.append((k, f"{len(shards):,}"))
    print(f"{args.shards:,} shards x {args.shard_size:,} samples, {args.ranks} ranks, global batch "
          f"{args.global_batch:,} ({args.global_batch // args.ranks:,} per rank) from {streams} streams of {per_step} "
          f"samples a step ({len(mine)} per rank), {args.shards_per_stream} shards open per stream, shuffle buffer "
          f"{args.buffer:,}; the order is the same for any number of workers")
    _table(["rank-0 batch", "distinct shards in it"], rows)
    print(f"\nshards per rank batch (min over {args.batches}): {min(int(r[1].replace(',', '')) for r in rows)}")


# --------------------------------------------------------------------------------------------- activation memory


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


def bench_memory(args):
    """Activation memory per sample = slope over the batch size (fixed costs cancel). RSS is made to track live
    tensors: glibc is told to serve every allocation above 128 KB by mmap and to return it on free (otherwise
    freed blocks stay resident and the numbers measure the allocator's slack, not the model)."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # read by glibc at the start of each spawned child
    b1, b2 = args.mem_batches
    rows, per_sample = [], {}
    for precision in args.mem_precisions:
        for ckpt in (False, True):
            r1, r2 = (_in_child(_activation_child, b, ckpt, precision) for b in (b1, b2))
            held, peak = ((r2[k] - r1[k]) / (b2 - b1) for k in ("held", "peak"))
            per_sample[precision, ckpt] = peak
            rows.append((precision, "on" if ckpt else "off", f"{held:.2f} MB", f"{peak:.2f} MB",
                         f"{r1['peak']:.0f} / {r2['peak']:.0f} MB"))
            print(*rows[-1], flush=True)
    _table(["CPU autocast", "grad checkpointing", "held for backward, per sample", "step peak, per sample",
            f"step peak above resident at batch {b1} / {b2}"], rows)

    # What fits on one GPU at that rate: weights + grads + AdamW moments in fp32 (16 bytes/parameter), the loss's
    # logits block for the paper's global batch (clip_loss recomputes them in backward: ~2 [b, N] fp32 at the peak),
    # and a reserve for the CUDA context, kernels' workspaces and allocator slack.
    n_params = sum(p.numel() for p in CLIP(CLIPConfig()).parameters())
    fixed_gib = 16 * n_params / 2 ** 30 + args.reserve_gb
    def gib(n, mb):  # memory of a per-GPU batch n at mb MiB of activations per sample
        return fixed_gib + (n * mb * 2 ** 20 + 2 * n * args.global_batch * 4) / 2 ** 30

    fit_rows = []
    for (precision, ckpt), mb in per_sample.items():
        cells = []
        for gpu_gb in (40, 80):
            b = 0
            for step in (4096, 1024, 256, 64, 16, 4, 1):  # the largest b that fits
                while gib(b + step, mb) <= gpu_gb:
                    b += step
            cells.append(f"{b:,}")
        fit_rows.append((precision, "on" if ckpt else "off", *cells))
    print(f"\nFixed: {16 * n_params / 2 ** 30:.2f} GiB (fp32 weights, grads, AdamW moments of {n_params:,} parameters)"
          f" + {args.reserve_gb} GiB reserve; loss logits for a global batch of {args.global_batch:,}.")
    _table(["activations as on CPU with", "grad checkpointing", "per-GPU batch in 40 GiB", "in 80 GiB"], fit_rows)
    print("\nThe paper's 5,120 pairs per GPU (30,720 on 6 A100s).")

# --------------------------------------------------------------------------------------------- GPU step


# ViT-B/32 CLIP forward: 14.5 GFLOPs per pair (torch.utils.flop_counter.FlopCounterMode on model.CLIP, 224 px, 77
# tokens; the way open_clip's profiler counts); x3 for forward + backward, the usual rule for transformers
GFLOPS_PER_PAIR = 44.0
GFLOPS_PER_PAIR_RECOMPUTE = 59.0  # + one more forward with full activation checkpointing
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}  # dense bf16


def bench_gpu(args):
    """Training step of ViT-B/32 CLIP on one GPU at the per-GPU batch (train_clip.train_step, bf16 autocast)."""
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark was not run")
        return
    import train_clip
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    rows = []
    for ckpt in args.gpu_ckpt:
        torch.manual_seed(0)
        raw = CLIP(CLIPConfig(grad_checkpointing=ckpt)).to(dev)
        model = torch.compile(raw) if args.compile else raw
        opt = adamw(raw, lr=1e-4)
        b = args.gpu_batch
        images, tokens = _fake_batch(b, dev)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.gpu_steps + 3):  # 3 warm-up steps (allocation, compilation)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_clip.train_step(model, images, tokens, args.accum_steps, autocast)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rate = b / statistics.median(times[3:])
        mfu = f"{rate * GFLOPS_PER_PAIR / 1e3 / peak:.1%}" if peak else "?"
        hfu = f"{rate * (GFLOPS_PER_PAIR_RECOMPUTE if ckpt else GFLOPS_PER_PAIR) / 1e3 / peak:.1%}" if peak else "?"
        rows.append((name, b, "on" if ckpt else "off", args.compile, f"{rate:.0f}",
                     f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB", mfu, hfu))
        print(*rows[-1], flush=True)
        del raw, model, opt
        torch.cuda.empty_cache()
    _table(["GPU", "batch/GPU", "grad ckpt", "compile", "pairs/s/GPU", "peak memory", "MFU (44 GF/pair)",
            "HFU (59 GF/pair with ckpt)"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    mo = sub.add_parser("model", help="ViT-B/32 training step, ours vs open_clip")
    mo.add_argument("--batch", type=int, default=8)
    mo.add_argument("--steps", type=int, default=2)
    mo.add_argument("--rounds", type=int, default=2, help="fresh processes per configuration (best is reported)")
    mo.add_argument("--mem-batch", type=int, default=32)
    lo = sub.add_parser("loss", help="clip_loss vs naive InfoNCE, memory and time")
    lo.add_argument("--loss-batch", type=int, default=4096)
    d = sub.add_parser("data", help="image-text data pipeline, samples/s per CPU core")
    d.add_argument("--data-samples", type=int, default=512, help="samples per round")
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--side", type=int, default=512, help="short side of the JPEGs in the shards")
    d.add_argument("--image-size", type=int, default=224)
    lo2 = sub.add_parser("loader", help="stage-2 loader alone: peak host memory at the per-rank batch")
    lo2.add_argument("--batch-size", type=int, default=5120, help="per-rank batch")
    lo2.add_argument("--workers", type=int, default=4)
    lo2.add_argument("--streams", type=int, default=40,
                     help="streams of this rank (the paper's: 240 streams shared by 6 ranks, 128 samples a step each)")
    lo2.add_argument("--batches", type=int, default=3)
    lo2.add_argument("--side", type=int, default=512, help="short side of the JPEGs in the shards")
    lo2.add_argument("--image-size", type=int, default=224)
    st = sub.add_parser("stall", help="the loader feeding a simulated step: the fraction of time spent waiting")
    st.add_argument("--batch-size", type=int, default=5120, help="per-rank batch")
    st.add_argument("--workers", type=int, default=2)
    st.add_argument("--streams", type=int, default=None, help="--data-streams (default: gcd(batch, 240))")
    st.add_argument("--steps", type=int, default=5, help="simulated steps measured (after the first batch)")
    st.add_argument("--step-factor", type=float, default=1.3,
                    help="the simulated step's length over the loader's own time per batch")
    st.add_argument("--side", type=int, default=256, help="short side of the JPEGs in the shards")
    st.add_argument("--image-size", type=int, default=224)
    mx = sub.add_parser("mixing", help="shards per rank batch at the paper's scale (simulated sample order)")
    mx.add_argument("--shards", type=int, default=1500)
    mx.add_argument("--shard-size", type=int, default=10000)
    mx.add_argument("--ranks", type=int, default=6)
    mx.add_argument("--global-batch", type=int, default=30720)
    mx.add_argument("--streams", type=int, default=None, help="--data-streams (default: the loader's)")
    mx.add_argument("--shards-per-stream", type=int, default=data.SHARDS_PER_STREAM)
    mx.add_argument("--buffer", type=int, default=data.SHUFFLE_BUFFER)
    mx.add_argument("--batches", type=int, default=5)
    m = sub.add_parser("memory", help="activation memory per sample on CPU and the per-GPU batch it allows")
    m.add_argument("--mem-batches", type=int, nargs=2, default=[16, 48])
    m.add_argument("--mem-precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    m.add_argument("--global-batch", type=int, default=30720)
    m.add_argument("--reserve-gb", type=float, default=3.0, help="GiB for the CUDA context, workspaces, fragmentation")
    g = sub.add_parser("gpu", help="CUDA training step: pairs/s/GPU, peak memory, MFU")
    g.add_argument("--gpu-batch", type=int, default=512)
    g.add_argument("--gpu-steps", type=int, default=10)
    g.add_argument("--gpu-ckpt", type=lambda s: s == "on", nargs="+", default=[False, True], help="off / on")
    g.add_argument("--accum-steps", type=int, default=1)
    g.add_argument("--compile", action="store_true")
    g.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: from the GPU name)")
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
