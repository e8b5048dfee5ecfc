"""Stage 2 of Perceptual Initialisation (PI paper §3.2): contrastive image-text pretraining of the whole CLIP, the
vision tower started from stage 1 (--init nights.pt), the text tower random. Without --init it is the paper's
baseline (§3.3).

  torchrun --nproc_per_node 6 train_clip.py --data 'yfcc/{00000..01499}.tar' \\
      --merges bpe_simple_vocab_16e6.txt.gz --init runs/nights/nights.pt --out runs/pi
  python train_clip.py --model tiny --data pairs.csv --merges merges.txt.gz --batch-size 64 --epochs 2 --out runs/tiny

--batch-size is the GLOBAL batch (the paper's 30,720): each of the G ranks holds batch/G pairs, and clip_loss
gathers the text features so that every step optimises the exact full-batch loss (eq. 3). When batch/G does not fit
in memory, --accum-steps K embeds it in K chunks and still computes the exact full-batch loss and gradient (the
gradient cache of Gao et al. 2021, see train_step), so one GPU can reproduce the paper's batch exactly.

Outputs in --out: log.jsonl (one line per --log-every steps), config.json (the CLIPConfig), args.json (the flags and
what --init loaded), epoch_<n>.pt (plain state dicts, for scaling curves and evaluate.py), state.pt (resumable
training state, written atomically every --save-every-steps steps and at each epoch end; --resume continues from it
with the same results as an unbroken run, and refuses another recipe). SIGTERM, SIGUSR1 or Ctrl-C stop the run after
its current step with state.pt written, and exit with status 75 (model.PREEMPTED).

The batches are a function of --seed, the data and --data-streams only (data.stream_pieces), not of the GPUs or
--workers: PI and its baseline see the same batches wherever each runs, and --resume continues a run mid-epoch on
another number of GPUs or workers exactly. The loader stays a step ahead: its workers run for the whole run, and a
thread joins the next rank batch while the current step runs (log.jsonl's host_wait says how long the loop waited).

The images travel as uint8 crops (data.py's workers decode, crop and flip) with each sample's photometric parameters;
the §3.4 colour jitter, grayscale, blur and the CLIP normalisation run batched on the training device, chunk by
chunk (device_images). Several nodes: see the README (torchrun rendezvous or SLURM); --out must be a folder every
node sees, since rank 0 writes the checkpoints and every rank reads state.pt on --resume.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from model import (CLIP, HelpFormatter, JsonlLogger, adamw, add_recipe_args, add_renamed, add_run_args, all_ranks_sum,
                   autocast, available_workers, catch_stop_signals, check_finite, cleanup_distributed, clip_loss,
                   cosine_lr, default_precision, load_init, parse_training_args, preset_config, print0, report_stop,
                   restore_signals, resume_training_state, resuming, run_main, save_checkpoint, setup_distributed,
                   stop_reason, training_state, warn_long_warmup, write_run_record)

SCRIPT = os.path.basename(__file__)
COUNTS = data.SKIPS + (data.REREAD,)  # the data loaders' counters that log.jsonl reports, summed over ranks


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_run_args(p, data_help="tar shards ('dir/{00000..01499}.tar', or patterns joined by '::') or a .csv/.tsv "
                              "file with image paths and captions", save_every_steps=100)
    add_renamed(p, "--train-data", "--data", "data")
    # data
    p.add_argument("--train-num-samples", type=int, default=None,
                   help="samples per epoch (default: the CSV's rows, or the sum of img2dataset's *_stats.json)")
    p.add_argument("--csv-img-key", default="filepath", help="CSV column with the image path (open_clip's name)")
    p.add_argument("--csv-caption-key", default="title", help="CSV column with the caption (open_clip's name)")
    p.add_argument("--csv-separator", default=None, help="default: tab for .tsv, comma otherwise")
    p.add_argument("--merges", default=None,
                   help="BPE merges file (bpe_simple_vocab_16e6.txt.gz, or one from data.learn_bpe)")
    p.add_argument("--data-streams", type=int, default=None,
                   help="canonical streams of the sample order (default gcd(--batch-size, 480)). The order depends "
                        "on seed, epoch, data and this alone, not on ranks or workers; the ranks must divide it. Give "
                        "runs you compare the same value")
    p.add_argument("--shuffle-buffer", type=int, default=data.SHUFFLE_BUFFER,
                   help="sample references per stream shuffle buffer")
    # model
    p.add_argument("--init", default=None,
                   help="stage-1 checkpoint: loads exactly its visual.* tensors; the text tower stays random")
    p.add_argument("--logit-scale-init", type=float, default=100.0,
                   help="initial exp(logit_scale): the paper's ln(100) init (§3.4); CLIP's own is 1/0.07 = 14.29")
    p.add_argument("--logit-scale-max", type=float, default=100.0,
                   help="clamp exp(logit_scale) after each step (CLIP's rule, kept by open_clip; the PI paper does "
                        "not say)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DDP-wrapped model (so each gradient bucket's all-reduce overlaps the rest "
                        "of the backward) and the device augmentation (see wrap_model)")
    # the recipe: epochs and batch are the paper's; it gives no optimiser settings, so these are open_clip's
    add_recipe_args(p, epochs=(32, "PI paper §3.2"), batch_size=(30720, "PI paper §3.4"),
                    lr=(5e-4, "ours: open_clip's ViT-B/32 value"), weight_decay=(0.2, "ours: open_clip's"),
                    warmup_steps=(2000, "ours: open_clip's; cosine decay to 0 after it"),
                    beta1=(0.9, "ours: open_clip's"), beta2=(0.98, "ours: open_clip's, CLIP paper's"),
                    eps=(1e-6, "ours: open_clip's, CLIP paper's"))
    add_renamed(p, "--warmup", "--warmup-steps", "warmup_steps", type=int)
    p.add_argument("--accum-steps", type=int, default=1,
                   help="split each rank's share into this many chunks; the loss and gradient stay those of the "
                        "full batch")
    # run
    p.add_argument("--log-every", type=int, default=1, help="steps per line of log.jsonl")
    p.add_argument("--zeroshot", default=None,
                   help="classification set(s) for a zero-shot check at each epoch end, comma-separated names "
                        "evaluate.py knows (e.g. imagenet1k,cifar10)")
    p.add_argument("--zeroshot-root", default=".",
                   help="evaluate.py's --data-root: one folder per set, or its webdataset copy (wds_<name>)")
    return p


def get_args(argv=None):
    return parse_training_args(get_parser(), argv)


class DeviceTimer:
    """Seconds spent in the timed blocks, measured on the device: CUDA events, read at the next log line (after the
    step's own synchronisation, so timing adds none); wall time on the CPU."""

    def __init__(self, device):
        self.cuda, self.events, self.seconds = device.type == "cuda", [], 0.0

    @contextmanager
    def __call__(self):
        if not self.cuda:
            t0 = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events.append((start, end))

    def read_and_reset(self):
        seconds = self.seconds + sum(a.elapsed_time(b) for a, b in self.events) / 1000  # ms -> s
        self.events, self.seconds = [], 0.0
        return seconds


def device_images(images, params, device, chunk=1024, transform=data.device_transform, timer=None):
    """A chunk of the rank batch as the model's input: uint8 crops (on the device already, or in pinned host memory,
    then copied without blocking) augmented on the device with their own photometric parameters (`transform`:
    data.device_transform, batched, or its compiled version). The augmentation's working memory is a few times its
    float output, so it runs `chunk` images at a time (~3 GB at 1,024 x 224 px) instead of 15+ GB for 5,120 at once.
    Float images are taken as preprocessed."""
    if images.is_floating_point():
        return images.to(device)
    images = images.to(device, non_blocking=True)
    params = None if params is None else params.to(device, non_blocking=True)
    with timer() if timer else nullcontext():  # log.jsonl's augment_s
        if params is None or len(images) <= chunk:
            return transform(images, params)
        out = torch.empty(images.shape, dtype=torch.float32, device=device)
        for start in range(0, len(images), chunk):  # filled in place: no second copy of the float batch
            out[start:start + chunk] = transform(images[start:start + chunk], params[start:start + chunk])
        return out


@functools.cache
def compiled_device_transform():
    """data.device_transform through torch.compile, made on first use (the compiled model's augmentation: dozens of
    elementwise passes over the float batch fused into a few kernels)."""
    return torch.compile(data.device_transform)


def wrap_model(raw, dist_env, compile=False, bucket_cap_mb=None):
    """The model train_step runs: DDP around the raw model on several ranks, then torch.compile around that, as
    open_clip does. Compiled inside DDP instead, every parameter gradient would come out of one compiled backward
    node and the all-reduce could start only when the whole backward is done; compiled around DDP, dynamo splits
    the graph at DDP's gradient-bucket boundaries (its DDPOptimizer), so each bucket is all-reduced while the
    backward of the layers before it still runs. bucket_cap_mb: DDP's bucket size (None: its default, 25 MB; the
    tests make it small, so that a tiny model has several buckets)."""
    model = raw
    if dist_env.world_size > 1:
        bucket = {} if bucket_cap_mb is None else dict(bucket_cap_mb=bucket_cap_mb)
        model = DDP(raw, device_ids=[dist_env.local_rank] if dist_env.device.type == "cuda" else None, **bucket)
    return torch.compile(model) if compile else model


def _ddp_of(model):
    """The DDP module in what wrap_model returned, or None. torch.compile's wrapper keeps the module it compiles as
    _orig_mod."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, DDP) else None


def train_step(model, images, tokens, accum_steps, amp, params=None, timer=None):
    """Forward and backward of this rank's share of one global batch. Returns this rank's loss (detached); the
    gradients left in the parameters are, after DDP's averaging, those of the full-batch loss (eq. 3).

    model: what wrap_model returned (the raw CLIP, DDP, either compiled); a compiled one also gets the compiled
    augmentation. images: uint8 [b, 3, S, S] crops with params [b, PHOTOMETRIC_PARAMS] (or None: no augmentation), on
    the device (or the host); each chunk becomes float only when it is embedded (device_images), and the float copy
    is freed before the backward (conv1 keeps its own bf16 copy under autocast), so it never exists in full for
    long. In fp32 the chunked gradient equals the one-chunk gradient up to float rounding; in bf16 autocast each
    chunk's forward rounds differently from the whole batch's, and the weight gradients differ by about 1-2%
    relative (the same size as bf16's own error against fp32). timer: a DeviceTimer for the augmentation."""
    device = tokens.device
    ddp = _ddp_of(model)
    transform = compiled_device_transform() if hasattr(model, "_orig_mod") else data.device_transform
    if accum_steps == 1:
        # outside autocast: the augmentation in fp32
        x = device_images(images, params, device, transform=transform, timer=timer)
        with amp:
            image_f, text_f, scale = model(x, tokens)
        del x  # 2.9 GB of fp32 at 5,120 x 224 px, not needed by the backward
        loss = clip_loss(image_f, text_f, scale)  # outside autocast: the softmax over N logits in fp32
        loss.backward()
        return loss.detach()

    # Gradient cache (Gao et al. 2021). The loss depends on the parameters only through the features, so
    # d loss / d theta = sum over chunks of (d features_chunk / d theta)^T (d loss / d features_chunk).
    # 1) embed every chunk without a graph; 2) compute the full-batch loss on those features, made leaves, and
    # backpropagate to them (clip_loss gathers across ranks, so this covers every rank's pairs); 3) re-run each chunk
    # with a graph and push its slice of the feature gradient through it. There is no dropout and each chunk is
    # augmented from its samples' own parameters, so the re-run reproduces the images and the features exactly.
    chunk_params = params.chunk(accum_steps) if params is not None else [None] * accum_steps
    chunks = list(zip(images.chunk(accum_steps), tokens.chunk(accum_steps), chunk_params))
    feats = []
    with torch.no_grad():  # through the wrapper too (DDP does nothing without grad), so a compiled model stays so
        for i, t, p in chunks:
            x = device_images(i, p, device, transform=transform, timer=timer)
            with amp:
                feats.append(model(x, t))
            del x
    image_f = torch.cat([f[0] for f in feats]).float().requires_grad_()
    text_f = torch.cat([f[1] for f in feats]).float().requires_grad_()
    scale = feats[0][2].detach().float().requires_grad_()
    del feats
    loss = clip_loss(image_f, text_f, scale)
    loss.backward()
    sizes = [len(t) for _, t, _ in chunks]
    for k, ((i, t, p), g_image, g_text) in enumerate(zip(chunks, image_f.grad.split(sizes), text_f.grad.split(sizes))):
        last = k == accum_steps - 1
        # DDP all-reduces the accumulated gradients once, in the last chunk's backward
        with nullcontext() if last or ddp is None else ddp.no_sync():
            x = device_images(i, p, device, transform=transform, timer=timer)
            with amp:
                fi, ft, s = model(x, t)
            del x
            # the logit scale's gradient rides on the last chunk, so that backward reaches every parameter
            g_scale = scale.grad if last else torch.zeros_like(scale.grad)
            torch.autograd.backward([fi, ft, s], [g_image.to(fi.dtype), g_text.to(ft.dtype), g_scale.to(s.dtype)])
    return loss.detach()


def rank_counts(saved, rank, world):
    """This rank's skip counters from state.pt (one dict per rank). Resumed on another number of ranks, rank 0
    carries the total, so that the sum over ranks stays right."""
    saved = [saved] if isinstance(saved, dict) else list(saved)  # a dict: written by an older version, rank 0's
    if len(saved) == world:
        return Counter(saved[rank])
    return sum(map(Counter, saved), Counter()) if rank == 0 else Counter()


def zero_shot_check(model, tokenizer, names, args):
    """The seam to evaluate.py: zero-shot top-1/top-5 on each named set under --zeroshot-root (one folder per set,
    as evaluate.py's --data-root). A set that is missing or fails is reported, never the end of the run."""
    import evaluate
    results = {}
    for name in names:
        root = evaluate.dataset_root(args.zeroshot_root, name)  # its webdataset copy where there is one
        try:
            results[name] = evaluate.zero_shot_eval(model, tokenizer, name, root, workers=args.workers)
        except Exception as err:  # DatasetUnavailable, or anything else: hours of training are worth more
            print(f"zero-shot check on {name} failed: {type(err).__name__}: {err}")
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    return results


# -----------------------------------------------------------------------------------------------------------------
# The pieces of a run: model, state (fresh or resumed), one optimiser step, logging, checkpoints


def build_model(args, vocab_size, device):
    """CLIP with the tokenizer's vocabulary and the paper's logit-scale init; with --init, stage 1's vision tower
    (a checkpoint of another architecture is an error naming the keys). Returns the model and what --init loaded
    (for args.json; None when resuming, which keeps the first start's record)."""
    cfg = preset_config(args.model, vocab_size=vocab_size, logit_scale_init=math.log(args.logit_scale_init),
                        grad_checkpointing=args.grad_checkpointing)
    model = CLIP(cfg)
    loaded = None if args.resume else {}
    if args.init and not args.resume:
        loaded = load_init(model.visual, args.init, "--init", prefix="visual.")
    return model.to(device), loaded


@dataclass
class Progress:
    """What a run carries from step to step, and through state.pt across a restart."""
    step: int = 0
    positions: dict = field(default_factory=dict)  # this rank's streams -> entries consumed this epoch
    skipped: Counter = field(default_factory=Counter)  # this rank's counters of COUNTS
    last_good: str = None  # the newest state.pt, named when a non-finite loss stops the run


def start_or_resume(args, model, optimizer, state_path, loader, dist_env):
    """A fresh Progress, or the one state.pt holds (weights and optimiser restored into model and optimizer)."""
    if not args.resume:
        return Progress()
    state = resume_training_state(state_path, model, optimizer, args=args, script=SCRIPT)
    skipped = rank_counts(state.get("skipped", []), dist_env.rank, dist_env.world_size)
    progress = Progress(state["step"], skipped=skipped,
                        last_good=state_path)
    saved = state.get("data", {})
    if saved.get("order") == data.ORDER_VERSION and saved.get("streams") == loader.streams:
        # every stream's position, whatever ranks x workers wrote them: this rank continues its own streams
        mine = loader.dataset.rank_streams
        progress.positions = {s: pos for s, pos in saved["positions"].items() if s in mine}
    elif progress.step % loader.steps_per_epoch:
        print(f"state.pt holds no positions of {loader.streams} data streams in this order (written with "
              f"{saved.get('streams')} or by an older version): the rest of this epoch is read from its start")
    return progress


def save_state(state_path, model, optimizer, progress, args, dist_env):
    """Every rank calls this (it gathers each rank's data positions and skip counters); rank 0 writes."""
    mine = (progress.positions, dict(progress.skipped))
    per_rank = [mine]
    if dist.is_initialized():
        per_rank = [None] * dist_env.world_size
        dist.all_gather_object(per_rank, mine)
    positions = {}  # the streams are global: one dict, whoever read them
    for p, _ in per_rank:
        positions.update(p)
    state = training_state(model, optimizer, progress.step, script=SCRIPT, skipped=[s for _, s in per_rank],
                           args=vars(args), config=dataclasses.asdict(model.config),
                           data=dict(order=data.ORDER_VERSION, streams=args.data_streams,
                                     positions=positions))
    if dist_env.is_main:
        save_checkpoint(state, state_path)
    progress.last_good = state_path


def optimizer_step(model, raw, optimizer, batch, amp, meter, args, progress, dist_env):
    """One step of eq. 3 on the global batch (this rank's share of it on the device; train_step augments the uint8
    images chunk by chunk). Returns the full-batch loss (the mean over ranks)."""
    loss = train_step(model, batch["images"], batch["tokens"], args.accum_steps, amp, params=batch["params"],
                      timer=meter.augment)
    # checking the all-rank loss on every rank stops all of them together, before the optimiser touches the
    # weights, so the last state.pt stays the last good state
    loss = all_ranks_sum([loss.item()], dist_env.device)[0] / dist_env.world_size
    check_finite(torch.tensor(loss), progress.step + 1, progress.last_good)  # numbered as in the log
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # CLIP's clamp of the learned temperature
        raw.logit_scale.clamp_(0, math.log(args.logit_scale_max))
    progress.step += 1
    progress.positions.update(batch["positions"])
    progress.skipped.update(batch["bad"])
    return loss


@dataclass
class Meter:
    """Wall time since the last log line; how much of it the loop waited for the next batch and its copy to the
    device (host_wait), and the device spent augmenting (augment); the workers' CPU seconds for those batches
    (decode, to tell whether they keep up)."""
    augment: DeviceTimer
    since: float = field(default_factory=time.perf_counter)
    host_wait: float = 0.0
    decode: float = 0.0
    warned: bool = False

    def read_and_reset(self):
        """(seconds, host-wait fraction, augmentation fraction, decode CPU-seconds) since the last call."""
        now = time.perf_counter()
        seconds, host_wait, decode = now - self.since, self.host_wait, self.decode
        self.since, self.host_wait, self.decode = now, 0.0, 0.0
        return seconds, host_wait / max(seconds, 1e-9), self.augment.read_and_reset() / max(seconds, 1e-9), decode


def warn_if_loader_falls_behind(meter, seconds, host_wait, decode, steps, args, dist_env):
    """Once per run, when the loop waited for data more than 5% of the time: the numbers, and what to change."""
    if meter.warned or host_wait <= 0.05:
        return
    meter.warned = True
    per_worker = decode / steps / max(args.workers, 1)  # CPU seconds of decoding each worker does per step
    rate = args.batch_size / dist_env.world_size * steps / max(decode, 1e-9)
    print(f"warning: the step waits {host_wait:.0%} of the time for data. Each of the {args.workers} workers of a "
          f"rank decodes its share of a batch in {per_worker:.2f} CPU-s ({rate:.0f} samples per CPU-second), "
          f"and a step takes {seconds / steps:.2f} s of which {(1 - host_wait) * seconds / steps:.2f} s compute: give "
          f"each rank more cores and --workers (this process may use {available_workers()})")


def log_step(logger, bar, raw, progress, epoch, loss, lr, meter, args, dist_env):
    """One log.jsonl line: loss, learning rate, temperature, throughput, data wait, all-rank skip counts; `epoch` is
    1-based, as in the epoch lines and epoch_<n>.pt."""
    counts = dict(zip(COUNTS, map(int, all_ranks_sum([progress.skipped[k] for k in COUNTS], dist_env.device))))
    seconds, host_wait, augment, decode = meter.read_and_reset()
    if progress.step > args.log_every:  # the first steps include the workers' start and compilation
        warn_if_loader_falls_behind(meter, seconds, host_wait, decode, args.log_every, args, dist_env)
    record = dict(step=progress.step, epoch=epoch, samples=progress.step * args.batch_size, loss=loss, lr=lr,
                  logit_scale=raw.logit_scale.exp().item(), samples_per_s=args.log_every * args.batch_size / seconds,
                  host_wait=host_wait, augment=augment, skipped={k: counts[k] for k in data.SKIPS},
                  reread=counts[data.REREAD])
    logger.log(**record)
    bar.set_postfix(loss=f"{loss:.4f}", scale=f"{record['logit_scale']:.1f}", wait=f"{host_wait:.0%}",
                    skipped=sum(record["skipped"].values()))


def end_of_epoch(epoch, raw, optimizer, progress, logger, tokenizer, zeroshot, state_path, args, dist_env):
    """epoch_<n>.pt and its zero-shot check first, state.pt last: a run killed in between resumes from the previous
    state.pt and redoes them, instead of skipping them for good."""
    progress.positions = {}  # the next epoch's streams start from their beginning
    if dist_env.is_main:
        save_checkpoint(raw.state_dict(), os.path.join(args.out, f"epoch_{epoch}.pt"))
        print0(f"epoch {epoch}: wrote {os.path.join(args.out, f'epoch_{epoch}.pt')}")
        record = dict(epoch=epoch, step=progress.step, samples=progress.step * args.batch_size)
        if zeroshot:
            record["zeroshot"] = zero_shot_check(raw, tokenizer, zeroshot, args)
        logger.log(**record)
    save_state(state_path, raw, optimizer, progress, args, dist_env)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for the checkpoint and the zero-shot check (--dist-timeout)


# -----------------------------------------------------------------------------------------------------------------
# The training loop


def main(argv=None):
    args = get_args(argv)
    dist_env = setup_distributed(timeout_minutes=args.dist_timeout)
    args.precision = args.precision or default_precision(dist_env.device)  # recorded, and checked by --resume
    amp = autocast(dist_env.device, args.precision)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    if dist_env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (the loss) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    zeroshot = []
    if args.zeroshot:  # check the names now, not after the first epoch
        import evaluate
        zeroshot = evaluate.parse_names(args.zeroshot, evaluate.BENCHMARKS, "--zeroshot set")

    # resolved before the --resume check compares it with the run's
    args.data_streams = args.data_streams or data.default_streams(args.batch_size)
    state_path = os.path.join(args.out, "state.pt")
    args.resume = resuming(args.resume, state_path, args, SCRIPT)
    tokenizer = data.Tokenizer(args.merges)
    raw, loaded = build_model(args, tokenizer.vocab_size, dist_env.device)
    optimizer = adamw(raw, args.lr, weight_decay=args.weight_decay, betas=(args.beta1, args.beta2), eps=args.eps)
    if args.batch_size % (dist_env.world_size * args.accum_steps):
        raise ValueError(f"--batch-size {args.batch_size} must divide into {dist_env.world_size} ranks x "
                         f"{args.accum_steps} chunks")
    loader = data.image_text_loader(
        args.data, tokenizer, raw.config.image_size, args.batch_size, epochs=args.epochs, rank=dist_env.rank,
        world_size=dist_env.world_size, workers=args.workers, seed=args.seed, samples_per_epoch=args.train_num_samples,
        streams=args.data_streams, buffer_size=args.shuffle_buffer, csv_img_key=args.csv_img_key,
        csv_caption_key=args.csv_caption_key, csv_sep=args.csv_separator, context_length=raw.config.context_length,
        pin_memory=dist_env.device.type == "cuda", augment=not args.no_augment)
    args.workers = loader.workers  # as used: lowered where it would not share the streams evenly
    steps_per_epoch = loader.steps_per_epoch
    total_steps = steps_per_epoch * args.epochs

    progress = start_or_resume(args, raw, optimizer, state_path, loader, dist_env)
    model = wrap_model(raw, dist_env, compile=args.compile)
    if dist_env.is_main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(raw.config), f, indent=1)
        write_run_record(args.out, SCRIPT, args, loaded)
        warn_long_warmup(args.warmup_steps, total_steps, "--warmup-steps")
        print(f"{sum(p.numel() for p in raw.parameters()):,} parameters; {dist_env.world_size} rank(s) x "
              f"{args.workers} workers; {steps_per_epoch} steps/epoch of {args.batch_size} = "
              f"{loader.samples_per_epoch:,} samples; {total_steps} steps")
    logger = JsonlLogger(os.path.join(args.out, "log.jsonl"), enabled=dist_env.is_main, resume=args.resume,
                         step=progress.step)
    bar = tqdm(total=total_steps, initial=progress.step, disable=not dist_env.is_main, dynamic_ncols=True)
    meter = Meter(augment=DeviceTimer(dist_env.device))
    catch_stop_signals()  # restored in `finally`; the loader's workers leave these signals to this process
    batches = loader.batches(start_step=progress.step, positions=progress.positions)  # all epochs, joined ahead
    try:
        while progress.step < total_steps:
            stop = stop_reason(progress.step, args.stop_after_steps, dist_env.device)  # all ranks agree
            if stop:  # --stop-after-steps reached, or a signal: state.pt, one line, and (signal) Preempted
                save_state(state_path, model=raw, optimizer=optimizer, progress=progress, args=args,
                           dist_env=dist_env)
                report_stop(stop, progress.step, total_steps, state_path, SCRIPT)
                return raw
            # data: the next rank batch, already joined (and pinned) by the loader's thread, onto the device
            t0 = time.perf_counter()
            batch = data.batch_to_device(next(batches), dist_env.device)
            meter.host_wait += time.perf_counter() - t0
            meter.decode += batch["decode_s"]
            # learning rate
            lr = cosine_lr(progress.step, total_steps, args.warmup_steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # step (eq. 3 over the global batch), stopping on a non-finite loss
            loss = optimizer_step(model, raw, optimizer, batch, amp=amp, meter=meter, args=args, progress=progress,
                                  dist_env=dist_env)
            del batch
            bar.update(1)
            # log and save
            epoch = (progress.step - 1) // steps_per_epoch + 1  # 1-based, as epoch_<n>.pt
            if progress.step % args.log_every == 0:
                log_step(logger, bar, raw, progress, epoch=epoch, loss=loss, lr=lr, meter=meter, args=args,
                         dist_env=dist_env)
            if progress.step % steps_per_epoch == 0:
                end_of_epoch(epoch, raw, optimizer, progress, logger=logger, tokenizer=tokenizer, zeroshot=zeroshot,
                             state_path=state_path, args=args, dist_env=dist_env)
            elif args.save_every_steps and progress.step % args.save_every_steps == 0:
                save_state(state_path, model=raw, optimizer=optimizer, progress=progress, args=args,
                           dist_env=dist_env)
    finally:
        batches.close()
        bar.close()
        del model  # DDP's reducer goes before the process group (freed after it, it can abort the interpreter's exit)
        cleanup_distributed()
        restore_signals()  # last: a rank still leaving when torchrun signals it, after another rank ended, exits 75
    return raw


if __name__ == "__main__":
    run_main(main)
