"""
Stage 1 of Perceptual-Initialization (PI paper §3.1): train CLIP's vision tower, from random initialisation, on the
NIGHTS human similarity triplets with the perceptual hinge loss (eq. 2). The text tower and the logit scale are
frozen at their random initialisation; stage 2 (train_clip.py --init nights.pt) takes the `visual.*` tensors.

    python train_nights.py --data /path/to/nights --out runs/nights               # one GPU (or CPU)
    torchrun --standalone --nproc_per_node 6 train_nights.py --data ... --out ...  # DDP, same results per step
    python train_nights.py ... --resume                                             # continue a run that died

Writes into --out: config.json (the CLIPConfig), args.json (the flags), log.jsonl (one line per epoch, 2AFC in
percent), state.pt (everything --resume needs; a signal stops the run after its step with it written, exit status
75), last.pt and best.pt (plain CLIP state dicts of the last / best-validation epoch) and nights.pt (the result:
a plain CLIP state dict, loadable by CLIP and by train_clip.py --init).

The training loop here (`train`, `evaluate`) is shared with finetune_qkv.py, which only changes what is trainable
and the defaults.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from data import NightsTriplets, worker_ignores_stop_signals
from model import (CLIP, HelpFormatter, JsonlLogger, adamw, add_recipe_args, add_run_args, all_ranks_sum, autocast,
                   catch_stop_signals, check_finite, cleanup_distributed, cosine_lr, default_precision, hinge_terms,
                   parse_training_args, perceptual_hinge_loss, preset_config, report_stop, restore_signals,
                   resume_training_state, resuming, run_main, save_checkpoint, setup_distributed, stop_reason,
                   training_state, triplet_distances, two_afc_scores, warn_long_warmup, write_run_record)


def add_nights_args(p, best_by, final_help):
    """The NIGHTS-specific flags, shared with finetune_qkv.py."""
    p.add_argument("--subset", type=float, default=1.0,
                   help="train on this fraction of the train triplets, 0.01 .. 1.0 (the sub-sampling study the PI "
                        "paper proposes in §5); the subset is fixed by --subset-seed, not by --seed")
    p.add_argument("--subset-seed", type=int, default=0, help="which triplets --subset keeps")
    p.add_argument("--margin", type=float, default=0.05,
                   help="hinge margin m, PI paper §3.1 (following Sundaram et al.)")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning-rate schedule after warm-up")
    p.add_argument("--best-by", choices=["val_2afc", "val_loss"], default=best_by,
                   help="what makes an epoch the best one, for best.pt")
    p.add_argument("--final", choices=["last", "best"], default=None, help=final_help)
    return p


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_run_args(p, data_help="NIGHTS folder as distributed (data.csv + ref/ + distort/)")
    add_nights_args(p, best_by="val_2afc",
                    final_help="which epoch becomes nights.pt (default: the last; the paper trains 32 epochs and "
                               "names no model selection) or the best one on val")
    # epochs and AdamW are the paper's (§3.1); the values it does not give are ours
    add_recipe_args(p, epochs=(32, "PI paper §3.1"), batch_size=(256, "ours; the paper gives none"),
                    lr=(5e-4, "ours; the paper gives none"),
                    weight_decay=(0.2, "ours: open_clip's ViT-B/32 value; the paper gives none"),
                    warmup_epochs=(1.0, "ours"), beta1=(0.9, "open_clip's"), beta2=(0.98, "open_clip's, CLIP's"),
                    eps=(1e-6, "open_clip's, CLIP's"))
    return p


def learning_rate(args, step, total_steps, warmup_steps):
    if args.schedule == "cosine":
        return cosine_lr(step, total_steps, warmup_steps, args.lr)
    return args.lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else args.lr


@torch.no_grad()
def evaluate(model, loader, device, precision, margin=0.05):
    """Hinge loss and 2AFC accuracy in percent (ties count half; evaluate.py's unit) over the loader, from
    model.triplet_distances (the encoding evaluate.py's NIGHTS 2AFC uses too); under DDP every rank holds a shard and
    the sums are all-reduced, so each rank returns the numbers for the whole split."""
    model.eval()
    d0, d1, label = triplet_distances(model, loader, device, precision)
    totals = torch.stack([hinge_terms(d0, d1, label, margin).sum(), two_afc_scores(d0, d1, label).sum(),
                          torch.tensor(float(len(label)), device=device)]).double()  # loss sum, correct, triplets
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, n = totals.tolist()
    return {"val_loss": loss_sum / n, "val_2afc": 100 * correct / n, "val_n": int(n)}


# -----------------------------------------------------------------------------------------------------------------
# The pieces of a run: data, state (fresh or resumed), one optimiser step, the end of an epoch


@dataclass
class NightsData:
    train_set: NightsTriplets
    sampler: DistributedSampler
    val_loader: DataLoader
    per_rank: int  # triplets per process per step
    steps_per_epoch: int

    def epoch_batches(self, epoch, done, workers, pin_memory):
        """The batches of `epoch` after the `done` this rank already trained on (a resumed run skips them)."""
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        order = list(self.sampler)[done * self.per_rank:]
        return DataLoader(self.train_set, batch_size=self.per_rank, sampler=order, num_workers=workers,
                          pin_memory=pin_memory, worker_init_fn=worker_ignores_stop_signals)


def nights_data(args, image_size, dist_env):
    """Train and val triplets for this rank. Every path in the splits is checked here, before any training."""
    train_set = NightsTriplets(args.data, "train", image_size, augment=not args.no_augment, subset=args.subset,
                               subset_seed=args.subset_seed, seed=args.seed)
    val_set = NightsTriplets(args.data, "val", image_size)
    if args.batch_size % dist_env.world_size:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {dist_env.world_size} processes")
    per_rank = args.batch_size // dist_env.world_size
    # The data order is a function of (seed, epoch) only (DistributedSampler seeds a generator with seed + epoch),
    # and rank r takes every world_size-th index, so together the ranks see the same batch as one process would.
    sampler = DistributedSampler(train_set, num_replicas=dist_env.world_size, rank=dist_env.rank, shuffle=True,
                                 seed=args.seed)
    val_shard = Subset(val_set, range(dist_env.rank, len(val_set), dist_env.world_size))
    val_loader = DataLoader(val_shard, batch_size=per_rank, num_workers=args.workers,
                            pin_memory=dist_env.device.type == "cuda", worker_init_fn=worker_ignores_stop_signals)
    return NightsData(train_set, sampler, val_loader, per_rank, math.ceil(len(sampler) / per_rank))


@dataclass
class Progress:
    """What a run carries from step to step, and through state.pt across a restart."""
    step: int = 0
    best: dict = None  # validation metrics of the best epoch so far
    init_metrics: dict = None  # validation metrics before training (epoch 0)
    epoch_loss: tuple = (0.0, 0)  # (train-loss sum, batches) of this epoch so far, on this rank


def start_or_resume(args, model, optimizer, state_path, schedule, script, dist_env):
    """A fresh Progress, or the one a killed run last wrote to state.pt (its weights and optimiser restored, after
    model.check_resume has compared the recipes)."""
    if not args.resume:
        return Progress()
    state = resume_training_state(state_path, model, optimizer, args=args, script=script)
    saved = {k: state[k] for k in schedule}
    if saved != schedule:  # the flags match (checked above), so the number of processes differs
        raise ValueError(f"{state_path} was written by a run with {saved}, this one has {schedule}: resume with the "
                         f"same number of processes")
    # the epoch's loss so far is the all-rank total, carried by rank 0
    return Progress(state["step"], state["best"], state["init_metrics"],
                    tuple(state["epoch_loss"]) if dist_env.is_main else (0.0, 0))


def save_state(state_path, model, optimizer, progress, schedule, args, script, dist_env):
    """Every rank calls this (the epoch-loss total is a collective); rank 0 writes state.pt atomically."""
    epoch_loss = all_ranks_sum(list(progress.epoch_loss), dist_env.device)
    if dist_env.is_main:
        save_checkpoint(training_state(model, optimizer, progress.step, script=script, best=progress.best,
                                       init_metrics=progress.init_metrics, epoch_loss=epoch_loss, args=vars(args),
                                       config=dataclasses.asdict(model.config), **schedule),
                        state_path)


def hinge_step(tower, optimizer, batch, margin, precision, step, state_path):
    """One optimiser step of eq. 2: one forward pass over the 3B images of the batch, whose thirds eq. 1 compares.
    A non-finite loss stops the run before the weights change."""
    ref, left, right, label = batch
    device = next(tower.parameters()).device
    images, label = torch.cat([ref, left, right]).to(device, non_blocking=True), label.to(device)
    with autocast(device, precision):
        f_ref, f_left, f_right = tower(images).chunk(3)
    loss = perceptual_hinge_loss(f_ref, f_left, f_right, label, margin)
    check_finite(loss, step, state_path if os.path.exists(state_path) else None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def end_of_epoch(model, data, progress, epoch, lr, seconds, args, export, dist_env):
    """Validation, the epoch's log line, last.pt and (if better) best.pt. Returns the epoch's metrics."""
    loss_sum, batches = all_ranks_sum(list(progress.epoch_loss), dist_env.device)
    metrics = {"epoch": epoch + 1, "step": progress.step, "train_loss": loss_sum / batches, "lr": lr,
               **evaluate(model, data.val_loader, dist_env.device, args.precision, args.margin), "epoch_s": seconds}
    best = progress.best
    better = best is None or (metrics["val_2afc"] > best["val_2afc"] if args.best_by == "val_2afc"
                              else metrics["val_loss"] < best["val_loss"])
    if dist_env.is_main:
        tqdm.write(f"epoch {epoch + 1}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
                   f"val 2AFC {metrics['val_2afc']:.2f}%" + (" (best)" if better else ""))
        weights = export(model)
        save_checkpoint(weights, os.path.join(args.out, "last.pt"))
        if better:
            save_checkpoint(weights, os.path.join(args.out, "best.pt"))
    if better:
        progress.best = metrics
    progress.epoch_loss = (0.0, 0)
    return metrics


def write_result(args, out_name, best):
    """The result: a copy of last.pt or best.pt, renamed into place so that it is never half-written."""
    source = os.path.join(args.out, "best.pt" if args.final == "best" else "last.pt")
    target = os.path.join(args.out, out_name)
    shutil.copyfile(source, target + ".tmp")
    os.replace(target + ".tmp", target)
    print(f"wrote {target} ({args.final} epoch; best val 2AFC epoch {best['epoch']}: {best['val_2afc']:.2f}%)")
    return target


# -----------------------------------------------------------------------------------------------------------------
# The training loop


def train(args, model, dist_env, out_name="nights.pt", export=None, script="train_nights.py", loaded=None):
    """Train the parameters of `model` that require grad (all inside model.visual) with the hinge loss on NIGHTS.

    export(model) -> the plain CLIP state dict written to last.pt / best.pt / out_name (default model.state_dict();
    finetune_qkv.py passes one that merges LoRA). script: which script runs (state.pt and args.json name it);
    loaded: what was loaded into the model before (args.json). Returns a dict of results (init/last/best validation
    metrics), or None when --stop-after-steps stopped the run (state.pt written: --resume continues it); a signal
    stops it the same way and raises model.Preempted.
    """
    export = export or (lambda m: m.state_dict())
    args.precision = args.precision or default_precision(dist_env.device)
    args.final = args.final or "last"
    model.to(dist_env.device)
    data = nights_data(args, model.config.image_size, dist_env)
    total_steps = args.epochs * data.steps_per_epoch
    warmup_steps = round(args.warmup_epochs * data.steps_per_epoch)
    schedule = {"steps_per_epoch": data.steps_per_epoch, "total_steps": total_steps}  # a resume must match these
    optimizer = adamw(model, lr=args.lr, weight_decay=args.weight_decay, betas=(args.beta1, args.beta2), eps=args.eps)
    if dist_env.is_main:
        print(f"{len(data.train_set)} train / {len(data.val_loader.dataset)} val triplets, {data.steps_per_epoch} "
              f"steps per epoch, {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
              f"parameters, {dist_env.world_size} process(es) on {dist_env.device}, {args.precision}")
        warn_long_warmup(warmup_steps, total_steps, f"--warmup-epochs {args.warmup_epochs}")

    os.makedirs(args.out, exist_ok=True)
    state_path = os.path.join(args.out, "state.pt")
    args.resume = resuming(args.resume, state_path, args, script)
    progress = start_or_resume(args, model, optimizer, state_path, schedule, script, dist_env)
    if dist_env.is_main:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(model.config), f, indent=2)
        write_run_record(args.out, script, args, None if args.resume else loaded or {})
    logger = JsonlLogger(os.path.join(args.out, "log.jsonl"), enabled=dist_env.is_main, resume=args.resume,
                         step=progress.step)
    if progress.init_metrics is None:  # the starting point, logged as epoch 0 (chance for a random init)
        progress.init_metrics = evaluate(model, data.val_loader, dist_env.device, args.precision, args.margin)
        logger.log(epoch=0, step=0, **progress.init_metrics)
        if dist_env.is_main:
            print(f"epoch 0 (init): val 2AFC {progress.init_metrics['val_2afc']:.2f}%, "
                  f"val loss {progress.init_metrics['val_loss']:.4f}")

    # Only the trainable parameters live in the vision tower, so DDP wraps just that (it has a plain forward).
    tower = DDP(model.visual, device_ids=[dist_env.local_rank] if dist_env.device.type == "cuda" else None) \
        if dist_env.world_size > 1 else model.visual
    metrics = None
    for epoch in range(progress.step // data.steps_per_epoch, args.epochs):
        done = progress.step - epoch * data.steps_per_epoch  # batches of this epoch before a resume
        batches = data.epoch_batches(epoch, done, args.workers, pin_memory=dist_env.device.type == "cuda")
        bar = tqdm(batches, total=data.steps_per_epoch, initial=done, disable=not dist_env.is_main,
                   desc=f"epoch {epoch + 1}/{args.epochs}")
        model.train()
        t0 = time.time()
        for batch in bar:
            stop = stop_reason(progress.step, args.stop_after_steps, dist_env.device)  # all ranks agree
            if stop:  # --stop-after-steps reached, or a signal: state.pt, one line, and (signal) Preempted
                save_state(state_path, model, optimizer, progress, schedule, args, script, dist_env)
                bar.close()
                report_stop(stop, progress.step, total_steps, state_path, script)
                return None
            # learning rate
            lr = learning_rate(args, progress.step, total_steps, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # step (eq. 2), stopping on a non-finite loss
            loss = hinge_step(tower, optimizer, batch, args.margin, args.precision, progress.step, state_path)
            progress.step += 1
            progress.epoch_loss = (progress.epoch_loss[0] + loss, progress.epoch_loss[1] + 1)
            # log and save
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if args.save_every_steps and progress.step % args.save_every_steps == 0:
                save_state(state_path, model, optimizer, progress, schedule, args, script, dist_env)
        bar.close()
        # end of epoch: validation and checkpoints, then state.pt (so a resumed run never misses an epoch's files)
        metrics = end_of_epoch(model, data, progress, epoch, lr, time.time() - t0, args, export, dist_env)
        logger.log(**metrics)
        save_state(state_path, model, optimizer, progress, schedule, args, script, dist_env)

    result = write_result(args, out_name, progress.best) if dist_env.is_main else os.path.join(args.out, out_name)
    return {"init": progress.init_metrics, "last": metrics, "best": progress.best, "checkpoint": result}


def main(argv=None):
    args = parse_training_args(get_parser(), argv)
    dist_env = setup_distributed(timeout_minutes=args.dist_timeout)
    catch_stop_signals()  # SIGTERM, SIGUSR1, Ctrl-C: stop after the current step, with state.pt written
    try:
        torch.manual_seed(args.seed)  # the same random CLIP on every rank
        model = CLIP(preset_config(args.model))
        # §3.1: only the vision encoder's parameters θ_v are trained; the text tower and logit scale stay as they are
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("visual."))
        model.set_grad_checkpointing(args.grad_checkpointing)
        return train(args, model, dist_env, out_name="nights.pt")
    finally:
        cleanup_distributed()
        restore_signals()  # last: a rank still leaving when torchrun signals it, after another rank ended, exits 75


if __name__ == "__main__":
    run_main(main)
