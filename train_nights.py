"""
Stage 1 of Perceptual-Initialization (PI paper §3.1): train CLIP's vision tower, from random initialisation, on the
NIGHTS human similarity triplets with the perceptual hinge loss (eq. 2). The text tower and the logit scale are
frozen at their random initialisation; stage 2 (train_clip.py --init nights.pt) takes the `visual.*` tensors.

    python train_nights.py --data /path/to/nights --out runs/nights               # one GPU (or CPU)
    torchrun --standalone --nproc_per_node 6 train_nights.py --data ... --out ...  # DDP, same results per step
    python train_nights.py ... --resume                                             # continue a run that died

Writes into --out: config.json (the CLIPConfig), log.jsonl (one line per epoch), state.pt (everything --resume
needs), last.pt and best.pt (plain CLIP state dicts of the last / best-validation epoch) and nights.pt (the result:
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

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from data import NightsTriplets
from model import (CLIP, CLIPConfig, JsonlLogger, adamw, autocast, check_finite, cleanup_distributed, cosine_lr,
                   perceptual_hinge_loss, resume_training_state, save_checkpoint, setup_distributed,
                   training_state, two_afc_accuracy)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows the defaults that are values (not None, not flags)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_run_args(p):
    """Arguments about data, output and running, shared with finetune_qkv.py (the optimisation recipe is not)."""
    p.add_argument("--data", required=True, help="NIGHTS folder as distributed (data.csv + ref/ + distort/)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--subset", type=float, default=1.0,
                   help="train on this fraction of the train triplets, 0.01 .. 1.0 (the sub-sampling study the PI "
                        "paper proposes in §5); the subset is fixed by --subset-seed, not by --seed")
    p.add_argument("--subset-seed", type=int, default=0, help="which triplets --subset keeps")
    p.add_argument("--no-augment", action="store_true", help="train without the §3.4 augmentations")
    p.add_argument("--seed", type=int, default=0, help="model init, data order and augmentation draws")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per process")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="bf16 autocast (default on GPU; fp32 master weights either way) or fp32 (default on CPU)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt")
    p.add_argument("--save-every-steps", type=int, default=0,
                   help="also write state.pt every N optimiser steps (it is always written after each epoch)")
    p.add_argument("--stop-after-steps", type=int, default=0,
                   help="stop after this many optimiser steps in total, having written state.pt, as if the run had "
                        "been killed (the schedule still spans --epochs); for testing --resume")
    return p


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_run_args(p)
    p.add_argument("--model", choices=["vit-b-32", "tiny"], default="vit-b-32",
                   help="CLIP ViT-B/32 (PI paper §3.1) or the tiny test preset")
    # the optimisation recipe: epochs, margin and AdamW are the paper's; the other values the paper does not give
    p.add_argument("--epochs", type=int, default=32, help="PI paper §3.1: 32 epochs")
    p.add_argument("--margin", type=float, default=0.05,
                   help="hinge margin m, PI paper §3.1 (following Sundaram et al.)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="triplets per optimiser step summed over all GPUs (ours; the paper does not give it)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (ours; not given in the paper)")
    p.add_argument("--weight-decay", type=float, default=0.2,
                   help="AdamW weight decay (ours, open_clip's value for ViT-B/32; not given in the paper)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length (ours)")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning-rate schedule after warm-up (ours)")
    p.add_argument("--best-by", choices=["val_2afc", "val_loss"], default="val_2afc",
                   help="what makes an epoch the best one, for best.pt")
    p.add_argument("--final", choices=["last", "best"], default="last",
                   help="which epoch becomes nights.pt: the last one (the paper trains 32 epochs and names no model "
                        "selection) or the best one on val")
    return p


def learning_rate(args, step, total_steps, warmup_steps):
    if args.schedule == "cosine":
        return cosine_lr(step, total_steps, warmup_steps, args.lr)
    return args.lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else args.lr


@torch.no_grad()
def evaluate(model, loader, device, precision, margin=0.05):
    """Hinge loss and 2AFC accuracy (ties count half) over the loader; under DDP every rank holds a shard and the
    sums are all-reduced, so each rank returns the numbers for the whole split."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct choices, triplets
    for ref, left, right, label in loader:
        images, label = torch.cat([ref, left, right]).to(device, non_blocking=True), label.to(device)
        with autocast(device, precision):
            f_ref, f_left, f_right = model.encode_image(images).float().chunk(3)
        n = label.shape[0]
        totals += torch.stack([perceptual_hinge_loss(f_ref, f_left, f_right, label, margin) * n,
                               two_afc_accuracy(f_ref, f_left, f_right, label) * n,
                               torch.tensor(float(n), device=device)]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, n = totals.tolist()
    return {"val_loss": loss_sum / n, "val_2afc": correct / n, "val_n": int(n)}


def train(args, model, d, out_name="nights.pt", export=None):
    """Train the parameters of `model` that require grad (all inside model.visual) with the hinge loss on NIGHTS.

    export(model) -> the plain CLIP state dict written to last.pt / best.pt / out_name (default model.state_dict();
    finetune_qkv.py passes one that merges LoRA). Returns a dict of results (init/last/best validation metrics), or
    None when --stop-after-steps stopped the run.
    """
    export = export or (lambda m: m.state_dict())
    device, is_cuda = d.device, d.device.type == "cuda"
    args.precision = args.precision or ("bf16" if is_cuda else "fp32")
    model.to(device)
    image_size = model.config.image_size

    # Data. Every path in the splits is checked here, before any training.
    train_set = NightsTriplets(args.data, "train", image_size, augment=not args.no_augment, subset=args.subset,
                               subset_seed=args.subset_seed, seed=args.seed)
    val_set = NightsTriplets(args.data, "val", image_size)
    if args.batch_size % d.world_size:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {d.world_size} processes")
    per_rank = args.batch_size // d.world_size
    # The data order is a function of (seed, epoch) only (DistributedSampler seeds a generator with seed + epoch),
    # and rank r takes every world_size-th index, so together the ranks see the same batch as one process would.
    sampler = DistributedSampler(train_set, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=args.seed)
    val_loader = DataLoader(Subset(val_set, range(d.rank, len(val_set), d.world_size)), batch_size=per_rank,
                            num_workers=args.workers, pin_memory=is_cuda)
    steps_per_epoch = math.ceil(len(sampler) / per_rank)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)

    optimizer = adamw(model, lr=args.lr, weight_decay=args.weight_decay)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if d.is_main:
        print(f"{len(train_set)} train / {len(val_set)} val triplets, {steps_per_epoch} steps per epoch, "
              f"{n_train:,} trainable parameters, {d.world_size} process(es) on {device}, {args.precision}")

    # State: fresh, or everything a killed run had when it last wrote state.pt.
    os.makedirs(args.out, exist_ok=True)
    state_path = os.path.join(args.out, "state.pt")
    step, best, init_metrics, epoch_loss = 0, None, None, [0.0, 0]  # epoch_loss: sum, batches (of this epoch)
    if args.resume:
        if not os.path.isfile(state_path):
            raise FileNotFoundError(f"--resume: no training state at {state_path}")
        state = resume_training_state(state_path, model, optimizer)
        if state["steps_per_epoch"] != steps_per_epoch or state["total_steps"] != total_steps:
            raise ValueError(f"{state_path} was written by a run with {state['steps_per_epoch']} steps per epoch and "
                             f"{state['total_steps']} in all, this one has {steps_per_epoch} and {total_steps}: resume "
                             f"with the same --batch-size, --epochs, --subset and number of processes")
        step, best, init_metrics = state["step"], state["best"], state["init_metrics"]
        # the finished batches of the current epoch: their loss total (over all ranks) is carried by rank 0
        epoch_loss = state["epoch_loss"] if d.is_main else [0.0, 0]
        if d.is_main:
            print(f"resumed from {state_path} at step {step}")
    elif os.path.exists(state_path):
        raise FileExistsError(f"{state_path} exists: pass --resume to continue that run, or choose another --out")
    if d.is_main:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(model.config), f, indent=2)
    logger = JsonlLogger(os.path.join(args.out, "log.jsonl"), enabled=d.is_main, resume=args.resume)

    def epoch_loss_total():  # [loss sum, batches] of this epoch so far, over all ranks
        total = torch.tensor(epoch_loss, dtype=torch.float64, device=device)
        if d.world_size > 1:
            dist.all_reduce(total)
        return total.tolist()

    def save_state():  # called by every rank (epoch_loss_total is a collective); rank 0 writes
        loss_so_far = epoch_loss_total()
        if d.is_main:
            save_checkpoint(training_state(model, optimizer, step, steps_per_epoch=steps_per_epoch,
                                           total_steps=total_steps, best=best, init_metrics=init_metrics,
                                           epoch_loss=loss_so_far, args=vars(args),
                                           config=dataclasses.asdict(model.config)),
                            state_path)

    if init_metrics is None:  # the starting point, logged as epoch 0 (chance for a random init)
        init_metrics = evaluate(model, val_loader, device, args.precision, args.margin)
        logger.log(epoch=0, step=0, **init_metrics)
        if d.is_main:
            print(f"epoch 0 (init): val 2AFC {init_metrics['val_2afc']:.4f}, val loss {init_metrics['val_loss']:.4f}")

    # Only the trainable parameters live in the vision tower, so DDP wraps just that (it has a plain forward).
    tower = DDP(model.visual, device_ids=[d.local_rank] if is_cuda else None) if d.world_size > 1 else model.visual
    metrics = None
    for epoch in range(step // steps_per_epoch, args.epochs):
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        done = step - epoch * steps_per_epoch  # batches of this epoch finished before a resume: skip them
        order = list(sampler)[done * per_rank:]
        loader = DataLoader(train_set, batch_size=per_rank, sampler=order, num_workers=args.workers,
                            pin_memory=is_cuda)
        model.train()
        t0 = time.time()
        bar = tqdm(loader, total=steps_per_epoch, initial=done, disable=not d.is_main,
                   desc=f"epoch {epoch + 1}/{args.epochs}")
        for ref, left, right, label in bar:
            if args.stop_after_steps and step >= args.stop_after_steps:
                save_state()
                if d.is_main:
                    print(f"stopped after step {step} (--stop-after-steps); continue with --resume")
                return None
            lr = learning_rate(args, step, total_steps, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # one forward pass over the 3B images of the batch; eq. 1 and 2 compare the three thirds
            images, label = torch.cat([ref, left, right]).to(device, non_blocking=True), label.to(device)
            with autocast(device, args.precision):
                f_ref, f_left, f_right = tower(images).chunk(3)
            loss = perceptual_hinge_loss(f_ref, f_left, f_right, label, args.margin)
            check_finite(loss, step, state_path if os.path.exists(state_path) else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            epoch_loss = [epoch_loss[0] + loss.item(), epoch_loss[1] + 1]
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if args.save_every_steps and step % args.save_every_steps == 0:
                save_state()
        bar.close()

        # end of epoch: mean train loss over all ranks, validation, checkpoints
        loss_sum, batches = epoch_loss_total()
        metrics = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / batches, "lr": lr,
                   **evaluate(model, val_loader, device, args.precision, args.margin), "epoch_s": time.time() - t0}
        epoch_loss = [0.0, 0]
        logger.log(**metrics)
        better = best is None or (metrics["val_2afc"] > best["val_2afc"] if args.best_by == "val_2afc"
                                  else metrics["val_loss"] < best["val_loss"])
        if d.is_main:
            tqdm.write(f"epoch {epoch + 1}: train loss {metrics['train_loss']:.4f}, "
                       f"val loss {metrics['val_loss']:.4f}, val 2AFC {metrics['val_2afc']:.4f}"
                       + (" (best)" if better else ""))
            weights = export(model)
            save_checkpoint(weights, os.path.join(args.out, "last.pt"))
            if better:
                save_checkpoint(weights, os.path.join(args.out, "best.pt"))
        if better:
            best = metrics
        save_state()  # after last.pt/best.pt, so a resumed run never misses this epoch's checkpoints

    # the result: a copy of last.pt or best.pt, renamed into place so it is never half-written
    if d.is_main:
        source = os.path.join(args.out, "best.pt" if args.final == "best" else "last.pt")
        target = os.path.join(args.out, out_name)
        shutil.copyfile(source, target + ".tmp")
        os.replace(target + ".tmp", target)
        print(f"wrote {target} ({args.final} epoch; best val 2AFC epoch {best['epoch']}: {best['val_2afc']:.4f})")
    return {"init": init_metrics, "last": metrics, "best": best, "checkpoint": os.path.join(args.out, out_name)}


def main(argv=None):
    args = get_parser().parse_args(argv)
    d = setup_distributed()
    try:
        torch.manual_seed(args.seed)  # the same random CLIP on every rank
        cfg = CLIPConfig.tiny() if args.model == "tiny" else CLIPConfig()
        model = CLIP(cfg)
        # §3.1: only the vision encoder's parameters θ_v are trained; the text tower and logit scale stay as they are
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("visual."))
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return train(args, model, d, out_name="nights.pt")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
