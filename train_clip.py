"""Stage 2 of Perceptual Initialisation (PI paper §3.2): contrastive image-text pretraining of the whole CLIP, the
vision tower started from stage 1 (--init nights.pt), the text tower random. Without --init it is the paper's
baseline (§3.3).

  torchrun --nproc_per_node 6 train_clip.py --train-data 'yfcc/{00000..01499}.tar' \\
      --merges bpe_simple_vocab_16e6.txt.gz --init runs/nights/nights.pt --out runs/pi
  python train_clip.py --model tiny --train-data pairs.csv --merges merges.txt.gz --batch-size 64 --epochs 2

--batch-size is the GLOBAL batch (the paper's 30,720): each of the G ranks holds batch/G pairs, and clip_loss
gathers the text features so that every step optimises the exact full-batch loss (eq. 3). When batch/G does not fit
in memory, --accum-steps K embeds it in K chunks and still computes the exact full-batch loss and gradient (the
gradient cache of Gao et al. 2021, see train_step), so one GPU can reproduce the paper's batch exactly.

Outputs in --out: log.jsonl (one line per --log-every steps), config.json (the CLIPConfig), epoch_<n>.pt (plain
state dicts, for scaling curves and evaluate.py), state.pt (resumable training state, written atomically every
--save-every steps and at each epoch end; --resume continues from it with the same results as an unbroken run).

The images travel as uint8 crops (data.py's workers decode, crop and flip) with each sample's photometric parameters;
the §3.4 colour jitter, grayscale, blur and the CLIP normalisation run batched on the training device, chunk by
chunk (device_images). Several nodes: see the README (torchrun rendezvous or SLURM); --out must be a folder every
node sees, since rank 0 writes the checkpoints and every rank reads state.pt on --resume.
"""
import argparse
import dataclasses
import json
import math
import os
import time
from collections import Counter
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from model import (CLIP, CLIPConfig, JsonlLogger, adamw, autocast, check_finite, cleanup_distributed, clip_loss,
                   cosine_lr, load_state_dict_checked, resume_training_state, save_checkpoint, setup_distributed, training_state)

SKIP_KINDS = ("no image", "no caption", "undecodable", "truncated")  # as counted by the data loaders
# "reread": samples a tar worker read a second time in one epoch because its shards held fewer usable samples than
# their _stats.json said (so that every rank still takes the same number of steps; see data.unit_stream)
COUNTS = SKIP_KINDS + ("reread",)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data
    a("--train-data", required=True, help="tar shards ('dir/{00000..01499}.tar', or patterns joined by '::') "
                                           "or a .csv/.tsv file with image paths and captions")
    a("--train-num-samples", type=int, default=None,
      help="samples per epoch (default: the CSV's rows, or the sum of img2dataset's *_stats.json)")
    a("--csv-img-key", default="filepath", help="CSV column with the image path (open_clip's name)")
    a("--csv-caption-key", default="title", help="CSV column with the caption (open_clip's name)")
    a("--csv-separator", default=None, help="default: tab for .tsv, comma otherwise")
    a("--merges", default=None, help="BPE merges file (bpe_simple_vocab_16e6.txt.gz, or one from data.learn_bpe)")
    a("--no-augment", action="store_true", help="resize + centre crop only, no §3.4 augmentations")
    a("--workers", type=int, default=4, help="DataLoader workers per rank (ours)")
    a("--shuffle-buffer", type=int, default=data.SHUFFLE_BUFFER, help="tar samples per worker shuffle buffer (ours)")
    a("--shards-per-worker", type=int, default=data.SHARDS_PER_WORKER,
      help="tar shards each worker reads at once, interleaved, so that a batch mixes many shards (ours)")
    a("--micro-batch", type=int, default=data.MICRO_BATCH,
      help="samples per worker item; a rank batch joins items from all workers (ours; bounds the loader's memory)")
    # model
    a("--model", choices=["vit-b-32", "tiny"], default="vit-b-32", help="ViT-B/32 as in the paper (§3.1, §3.4)")
    a("--init", default=None,
      help="stage-1 checkpoint: loads exactly its visual.* tensors; the text tower stays random")
    a("--logit-scale-init", type=float, default=100.0,
      help="initial exp(logit_scale): the paper's ln(100) init (§3.4); CLIP's own is 1/0.07 = 14.29")
    a("--logit-scale-max", type=float, default=100.0,
      help="clamp exp(logit_scale) to at most this after each step (CLIP's rule, kept by open_clip; the PI paper "
           "does not say)")
    a("--grad-checkpointing", action="store_true", help="recompute block activations in backward (less memory)")
    a("--compile", action="store_true", help="torch.compile the model (GPU)")
    a("--precision", choices=["bf16", "fp32"], default=None, help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    # optimisation
    a("--epochs", type=int, default=32, help="the paper's 32 epochs of YFCC15M (§3.2)")
    a("--batch-size", type=int, default=30720, help="GLOBAL batch, the paper's 30,720 (§3.4)")
    a("--accum-steps", type=int, default=1,
      help="split each rank's share into this many chunks; the loss and gradient stay those of the full batch")
    a("--lr", type=float, default=5e-4, help="peak learning rate (ours: open_clip's ViT-B/32 value)")
    a("--warmup", type=int, default=2000, help="linear warm-up steps, then cosine decay to 0 (ours)")
    a("--wd", type=float, default=0.2, help="AdamW weight decay on matrices and embeddings (ours: open_clip's)")
    a("--beta1", type=float, default=0.9, help="AdamW beta1 (ours: open_clip's)")
    a("--beta2", type=float, default=0.98, help="AdamW beta2 (ours: open_clip's / CLIP paper's)")
    a("--eps", type=float, default=1e-6, help="AdamW eps (ours: open_clip's / CLIP paper's)")
    # run
    a("--out", default="runs/clip")
    a("--seed", type=int, default=0)
    a("--resume", action="store_true", help="continue from <out>/state.pt")
    a("--save-every", type=int, default=100, help="write <out>/state.pt every this many steps")
    a("--log-every", type=int, default=1)
    a("--stop-after-steps", type=int, default=None,
      help="exit after this many steps in total WITHOUT saving (a stand-in for a crash, for tests)")
    a("--zeroshot", default=None, help="classification set(s) for a zero-shot check at each epoch end, comma-separated "
                                       "names evaluate.py knows (e.g. imagenet1k,cifar10)")
    a("--zeroshot-root", default=".", help="evaluate.py's --data-root: one folder per set")
    a("--dist-timeout", type=float, default=60,
      help="minutes a collective may wait for the other ranks; they wait at the epoch-end barrier while rank 0 writes "
           "the checkpoint and runs the --zeroshot check (torch's NCCL default, 10 minutes, can be too short)")
    return p.parse_args(argv)


def device_images(images, params, device):
    """A chunk of the rank batch as the model's input: uint8 crops (pinned host memory on GPU) are copied to the
    device without blocking and augmented there with their own photometric parameters (data.device_transform,
    batched). Float images are taken as already preprocessed."""
    if images.is_floating_point():
        return images.to(device)
    params = None if params is None else params.to(device, non_blocking=True)
    return data.device_transform(images.to(device, non_blocking=True), params)


def train_step(model, images, tokens, accum_steps, autocast, params=None):
    """Forward and backward of this rank's share of one global batch. Returns this rank's loss (detached); the
    gradients left in the parameters are, after DDP's averaging, those of the full-batch loss (eq. 3).

    images: uint8 [b, 3, S, S] crops with params [b, PHOTOMETRIC_PARAMS] (or None: no augmentation), on the host or
    the device; each chunk becomes float only on the device, when it is embedded (device_images), so the float
    batch never exists in full. In fp32 the chunked gradient equals the one-chunk gradient up to float rounding; in
    bf16 autocast each chunk's forward rounds differently from the whole batch's, and the weight gradients differ by
    about 1-2% relative (the same size as bf16's own error against fp32)."""
    device = tokens.device
    if accum_steps == 1:
        x = device_images(images, params, device)  # outside autocast: the augmentation stays fp32
        with autocast:
            image_f, text_f, scale = model(x, tokens)
        loss = clip_loss(image_f, text_f, scale)  # outside autocast: the softmax over N logits in fp32
        loss.backward()
        return loss.detach()

    # Gradient cache (Gao et al. 2021). The loss depends on the parameters only through the features, so
    # d loss / d theta = sum over chunks of (d features_chunk / d theta)^T (d loss / d features_chunk).
    # 1) embed every chunk without a graph; 2) compute the full-batch loss on those features, made leaves, and
    # backpropagate to them (clip_loss gathers across ranks, so this covers every rank's pairs); 3) re-run each chunk
    # with a graph and push its slice of the feature gradient through it. There is no dropout and each chunk is
    # augmented from its samples' own parameters, so the re-run reproduces the images and the features exactly.
    inner = model.module if isinstance(model, DDP) else model
    chunk_params = params.chunk(accum_steps) if params is not None else [None] * accum_steps
    chunks = list(zip(images.chunk(accum_steps), tokens.chunk(accum_steps), chunk_params))
    feats = []
    with torch.no_grad():
        for i, t, p in chunks:
            x = device_images(i, p, device)
            with autocast:
                feats.append(inner(x, t))
    image_f = torch.cat([f[0] for f in feats]).float().requires_grad_()
    text_f = torch.cat([f[1] for f in feats]).float().requires_grad_()
    scale = feats[0][2].detach().float().requires_grad_()
    loss = clip_loss(image_f, text_f, scale)
    loss.backward()
    sizes = [len(t) for _, t, _ in chunks]
    for k, ((i, t, p), g_image, g_text) in enumerate(zip(chunks, image_f.grad.split(sizes), text_f.grad.split(sizes))):
        last = k == accum_steps - 1
        # DDP all-reduces the accumulated gradients once, in the last chunk's backward
        with nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            x = device_images(i, p, device)
            with autocast:
                fi, ft, s = model(x, t)
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


def all_ranks_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def zero_shot_check(model, tokenizer, names, args):
    """The seam to evaluate.py: zero-shot top-1/top-5 on each named set under --zeroshot-root (one folder per set,
    as evaluate.py's --data-root). A set that is missing or fails is reported, never the end of the run."""
    import evaluate
    results = {}
    for name in names:
        root = os.path.join(args.zeroshot_root, evaluate.BENCHMARKS[name].folder or name)
        try:
            results[name] = evaluate.zero_shot_eval(model, tokenizer, name, root, workers=args.workers)
        except Exception as err:  # DatasetUnavailable, or anything else: hours of training are worth more
            print(f"zero-shot check on {name} failed: {type(err).__name__}: {err}")
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    return results


def main(argv=None):
    args = get_args(argv)
    d = setup_distributed(args.dist_timeout)
    amp = autocast(d.device, args.precision)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (the loss) on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    zeroshot = []
    if args.zeroshot:  # check the names now, not after the first epoch
        import evaluate
        zeroshot = evaluate.parse_names(args.zeroshot, evaluate.BENCHMARKS, "--zeroshot set")
    tokenizer = data.Tokenizer(args.merges)
    make_config = CLIPConfig.tiny if args.model == "tiny" else CLIPConfig
    cfg = make_config(vocab_size=tokenizer.vocab_size, logit_scale_init=math.log(args.logit_scale_init),
                      grad_checkpointing=args.grad_checkpointing)
    raw = CLIP(cfg)
    if args.init and not args.resume:  # stage 1's vision tower; a checkpoint of another architecture is an error
        load_state_dict_checked(raw.visual, args.init, prefix="visual.", what=f"--init {args.init}")
    raw.to(d.device)
    optimizer = adamw(raw, args.lr, weight_decay=args.wd, betas=(args.beta1, args.beta2), eps=args.eps)

    world = d.world_size
    if args.batch_size % (world * args.accum_steps):
        raise ValueError(f"--batch-size {args.batch_size} must divide into {world} ranks x {args.accum_steps} chunks")
    loader = data.image_text_loader(
        args.train_data, tokenizer, cfg.image_size, args.batch_size, rank=d.rank, world_size=world,
        workers=args.workers, seed=args.seed, samples_per_epoch=args.train_num_samples, buffer_size=args.shuffle_buffer,
        csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key, csv_sep=args.csv_separator,
        context_length=cfg.context_length, pin_memory=d.device.type == "cuda", augment=not args.no_augment,
        micro_batch=args.micro_batch, shards_per_worker=args.shards_per_worker)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = steps_per_epoch * args.epochs

    # resume: weights, optimiser, step, each rank's skip counters, and where each data worker was in its stream
    state_path = os.path.join(args.out, "state.pt")
    step, positions, skipped = 0, {}, Counter()
    if not args.resume and os.path.exists(state_path):  # never overwrite a run's state by accident
        raise FileExistsError(f"{state_path} exists: pass --resume to continue that run, or choose another --out")
    if args.resume:
        state = resume_training_state(state_path, raw, optimizer)
        step, skipped = state["step"], rank_counts(state.get("skipped", []), d.rank, world)
        saved = state.get("data", {})
        if (saved.get("world_size"), saved.get("workers")) == (world, args.workers):
            positions = saved["positions"][d.rank]
        elif loader.kind == "tar" and step % steps_per_epoch:
            print(f"resuming with {world} ranks x {args.workers} workers instead of {saved.get('world_size')} x "
                  f"{saved.get('workers')}: the rest of this epoch is read from the start of the shards")
    last_good = state_path if args.resume else None

    model = torch.compile(raw) if args.compile else raw
    if world > 1:
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    if d.is_main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        print(f"{sum(p.numel() for p in raw.parameters()):,} parameters; {world} rank(s); "
              f"{steps_per_epoch} steps/epoch of {args.batch_size} = {loader.samples_per_epoch:,} samples; "
              f"{total_steps} steps")
    logger = JsonlLogger(os.path.join(args.out, "log.jsonl"), enabled=d.is_main, resume=args.resume)

    def training_state_now(epoch):  # collective: every rank's data positions and skip counters
        per_rank = [(positions, dict(skipped))]
        if dist.is_initialized():
            per_rank = [None] * world
            dist.all_gather_object(per_rank, (positions, dict(skipped)))
        return training_state(raw, optimizer, step, epoch=epoch, skipped=[s for _, s in per_rank], args=vars(args),
                              config=dataclasses.asdict(cfg),
                              data=dict(world_size=world, workers=args.workers, positions=[p for p, _ in per_rank]))

    bar = tqdm(total=total_steps, initial=step, disable=not d.is_main, dynamic_ncols=True)
    stop = args.stop_after_steps if args.stop_after_steps is not None else total_steps
    epoch = step // steps_per_epoch
    t_last, wait, busy = time.perf_counter(), 0.0, 0.0
    try:
        while step < min(total_steps, stop):
            batches = iter(loader.epoch(epoch, step % steps_per_epoch, positions))
            while step < min((epoch + 1) * steps_per_epoch, stop):
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                tokens = batch["tokens"].to(d.device, non_blocking=True)
                lr = cosine_lr(step, total_steps, args.warmup, args.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # the uint8 images stay on the host: train_step moves and augments them chunk by chunk
                loss = train_step(model, batch["images"], tokens, args.accum_steps, amp, params=batch["params"])
                # the mean over ranks is the full-batch loss; checking it on every rank stops all of them together,
                # before the optimiser touches the weights, so the last checkpoint stays the last good state
                loss = all_ranks_sum([loss.item()], d.device)[0] / world
                check_finite(torch.tensor(loss), step + 1, last_good)  # numbered as in the log
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():  # CLIP's clamp: the logit scale at most ln(100)
                    raw.logit_scale.clamp_(0, math.log(args.logit_scale_max))
                step += 1
                positions.update(batch["positions"])
                skipped.update(batch["bad"])
                t2 = time.perf_counter()
                wait, busy = wait + (t1 - t0), busy + (t2 - t0)
                bar.update(1)
                if step % args.log_every == 0:
                    counts = dict(zip(COUNTS, map(int, all_ranks_sum([skipped[k] for k in COUNTS], d.device))))
                    n_skipped = [counts[k] for k in SKIP_KINDS]
                    record = dict(step=step, epoch=epoch, samples=step * args.batch_size, loss=loss, lr=lr,
                                  logit_scale=raw.logit_scale.exp().item(),
                                  samples_per_s=args.log_every * args.batch_size / (t2 - t_last),
                                  data_wait=wait / busy, skipped={k: counts[k] for k in SKIP_KINDS},
                                  reread=counts["reread"])
                    logger.log(**record)
                    bar.set_postfix(loss=f"{loss:.4f}", scale=f"{record['logit_scale']:.1f}",
                                    wait=f"{record['data_wait']:.0%}", skipped=int(sum(n_skipped)))
                    t_last, wait, busy = t2, 0.0, 0.0
                if step % args.save_every == 0 and step % steps_per_epoch:
                    state = training_state_now(epoch)
                    if d.is_main:
                        save_checkpoint(state, state_path)
                    last_good = state_path
            if step < (epoch + 1) * steps_per_epoch:
                break  # --stop-after-steps: leave as a crash would, without saving
            epoch, positions = epoch + 1, {}
            state = training_state_now(epoch)
            if d.is_main:
                # the epoch's weights and its zero-shot check first, state.pt last: a run killed in between resumes
                # from the previous state.pt and redoes them, instead of skipping them for good
                save_checkpoint(raw.state_dict(), os.path.join(args.out, f"epoch_{epoch}.pt"))
                record = dict(epoch=epoch, step=step, samples=step * args.batch_size)
                if zeroshot:
                    record["zeroshot"] = zero_shot_check(raw, tokenizer, zeroshot, args)
                logger.log(**record)
                save_checkpoint(state, state_path)
            last_good = state_path
            if dist.is_initialized():
                dist.barrier()  # the other ranks wait for the checkpoint and the zero-shot check
    finally:
        bar.close()
        cleanup_distributed()
    return raw


if __name__ == "__main__":
    main()
