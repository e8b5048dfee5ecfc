"""
The perceptual fine-tuning comparison (PI paper §3.3): start from a trained CLIP, unfreeze only the Q, K, V projections
of every attention block of the vision tower (`visual.transformer.resblocks.*.attn.in_proj_weight/bias`; everything
else -- the rest of the ViT, the text tower, the logit scale -- stays frozen), and train 8 epochs of the perceptual
hinge loss (eq. 2) on NIGHTS with AdamW.

--lora R instead follows Sundaram et al.'s recipe as DreamSim's own training code runs it (github.com/ssundaram21/
dreamsim: training/train.py with configs/train_single_model_lora.yaml): the QKV weights stay frozen and a rank-R
update W + (alpha/R)·B·A·dropout(x) is trained (R 16, alpha 32, LoRA dropout 0.2, PEFT's LoRA), with Adam
betas (0.5, 0.999), lr 3e-4, no weight decay, batch 32, 8 epochs, margin 0.05 and no augmentation (DreamSim's
loader only resizes); the epoch with the lowest validation loss is kept. Every value has a flag. Every checkpoint
this script writes has LoRA merged back into plain `in_proj_weight`s, so it loads into CLIP like any other.

    python finetune_qkv.py --checkpoint runs/baseline/epoch_32.pt --data /path/to/nights --out runs/ft_qkv
    python finetune_qkv.py --checkpoint runs/baseline/epoch_32.pt --data ... --out runs/ft_lora --lora 16

The model is rebuilt by model.config_for: --config, else the config.json beside the checkpoint, else --model. The
training loop, evaluation, checkpointing and --resume are those of train_nights.py; the result is
<out>/finetuned.pt.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from model import (Attention, CLIP, HelpFormatter, add_recipe_args, add_run_args, architecture_hint, catch_stop_signals,
                   cleanup_distributed, config_for, load_init, parse_training_args, restore_signals, run_main,
                   setup_distributed)
from train_nights import add_nights_args, train


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the trained CLIP to fine-tune (a plain state dict)")
    p.add_argument("--config", default=None,
                   help="CLIPConfig JSON of the checkpoint (default: the config.json beside it; without one, the "
                        "--model preset, else ViT-B-32)")
    add_run_args(p, data_help="NIGHTS folder as distributed (data.csv + ref/ + distort/)", model=None)
    add_nights_args(p, best_by="val_loss",
                    final_help="which epoch becomes finetuned.pt (default: best with --lora, as Sundaram et al.; the "
                               "last of the 8 epochs without, as the PI paper §3.3 describes)")
    p.add_argument("--augment", action="store_true",
                   help="with --lora: train with the §3.4 augmentations anyway (DreamSim trains without; without "
                        "--lora they are on unless --no-augment)")
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="0: train the QKV projections themselves; R > 0: train a rank-R LoRA update of them instead "
                        "(DreamSim's code: R = 16)")
    p.add_argument("--lora-alpha", type=float, default=32.0,
                   help="LoRA scale alpha, the update is alpha/R·B·A (DreamSim's config: 32)")
    p.add_argument("--lora-dropout", type=float, default=0.2,
                   help="dropout on the LoRA branch's input, as PEFT (DreamSim's config: 0.2)")
    # 8 epochs, the margin and AdamW are the PI paper's (§3.3); with --lora the unset values are DreamSim's
    # (LORA_RECIPE), without it QKV_RECIPE; the PI paper gives none of them
    add_recipe_args(p, epochs=(8, "PI paper §3.3 and DreamSim's config"),
                    batch_size=(None, "16; with --lora DreamSim's 32"),
                    lr=(3e-4, "Sundaram et al. and DreamSim's config"),
                    weight_decay=(0.0, "DreamSim's config; Adam and AdamW agree at 0"),
                    warmup_epochs=(0.0, "none, as DreamSim"),
                    beta1=(None, "0.9 as stage 2; with --lora DreamSim's 0.5"),
                    beta2=(None, "0.98 as stage 2; with --lora DreamSim's 0.999"),
                    eps=(None, "1e-6 as stage 2; with --lora torch's default 1e-8, as DreamSim"))
    p.set_defaults(schedule="constant")  # as DreamSim's code
    return p


def is_qkv(name):
    """The fused Q, K, V projection (weight and bias) of a vision attention block."""
    return name.startswith("visual.transformer.resblocks.") and ".attn.in_proj_" in name


class LoRA(nn.Module):
    """A parametrization W -> W + (alpha / r) · B · A (Hu et al. 2021; PEFT's initialisation: A Kaiming-uniform,
    B zero, so training starts exactly at W). `dropout` acts on the input of the low-rank branch (LoRAAttention)."""

    def __init__(self, out_features, in_features, r, alpha, dropout=0.0):
        super().__init__()
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight):
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


class LoRAAttention(Attention):
    """model.Attention with PEFT's LoRA dropout on its QKV projection: while training, qkv = W x + b + s·B·A·drop(x),
    which no single weight can express, so the projection is computed here and the rest of the block is
    model.Attention.forward's. In eval mode (or without dropout) it is exactly Attention with the merged weight."""

    def forward(self, x, causal=False):
        lora = self.parametrizations.in_proj_weight[0]
        if not (self.training and lora.dropout.p > 0):
            return super().forward(x, causal)
        B, L, W = x.shape
        weight = self.parametrizations.in_proj_weight.original
        qkv = F.linear(x, weight, self.in_proj_bias) + lora.scale * F.linear(F.linear(lora.dropout(x), lora.lora_A),
                                                                             lora.lora_B)
        q, k, v = (t.view(B, L, self.heads, W // self.heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, W))


def add_lora(model, r, alpha, dropout=0.0):
    """Attach LoRA to every vision attention block's in_proj_weight; the original weight becomes
    `...attn.parametrizations.in_proj_weight.original` (frozen by the caller)."""
    for block in model.visual.transformer.resblocks:
        out_features, in_features = block.attn.in_proj_weight.shape
        block.attn.__class__ = LoRAAttention  # before parametrizing, which subclasses the module's class
        parametrize.register_parametrization(block.attn, "in_proj_weight",
                                             LoRA(out_features, in_features, r, alpha, dropout))


def merged_state_dict(model):
    """The plain CLIP state dict: each parametrized weight replaced by its current value (W + scale·B·A), the LoRA
    factors dropped. Without parametrizations this is model.state_dict()."""
    out = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." not in key:
            out[key] = value
        elif key.endswith(".original"):
            module_name, rest = key.split(".parametrizations.")
            name = rest.removesuffix(".original")
            out[f"{module_name}.{name}"] = getattr(model.get_submodule(module_name), name).detach().clone()
    return out


# Sundaram et al.'s LoRA recipe as DreamSim's code runs it: training/train.py (torch.optim.Adam with betas
# (0.5, 0.999), the dataset's resize-only preprocessing) with configs/train_single_model_lora.yaml (lr 3e-4, weight
# decay 0, batch 32, 8 epochs, margin 0.05, LoRA r 16, alpha 32, dropout 0.2). Without --lora: our defaults.
LORA_RECIPE = {"batch_size": 32, "beta1": 0.5, "beta2": 0.999, "eps": 1e-8}
QKV_RECIPE = {"batch_size": 16, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6}


def resolve_recipe(args):
    """Fill the flags left unset with the recipe of the mode (LoRA or plain QKV); with --lora, no augmentation
    unless --augment."""
    for key, value in (LORA_RECIPE if args.lora else QKV_RECIPE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lora and not args.augment:
        args.no_augment = True
    args.final = args.final or ("best" if args.lora else "last")
    return args


def main(argv=None):
    args = resolve_recipe(parse_training_args(get_parser(), argv))
    dist_env = setup_distributed(timeout_minutes=args.dist_timeout)
    catch_stop_signals()  # SIGTERM, SIGUSR1, Ctrl-C: stop after the current step, with state.pt written
    try:
        torch.manual_seed(args.seed)  # the LoRA initialisation, identical on every rank
        model = CLIP(config_for(args.checkpoint, preset=args.model, config=args.config))
        # a wrong architecture stops here, naming the keys (and, without a config.json, --config and --model)
        loaded = load_init(model, args.checkpoint, "--checkpoint",
                           hint=architecture_hint(args.checkpoint, preset=args.model, config=args.config))
        if args.lora:
            add_lora(model, args.lora, args.lora_alpha, args.lora_dropout)
        for name, p in model.named_parameters():
            # §3.3: only Q, K, V of every vision attention block are unfrozen (with LoRA: only the LoRA factors)
            p.requires_grad_(".lora_" in name if args.lora else is_qkv(name))
        model.set_grad_checkpointing(args.grad_checkpointing)
        return train(args, model, dist_env, out_name="finetuned.pt", export=merged_state_dict,
                     script="finetune_qkv.py", loaded=loaded)
    finally:
        cleanup_distributed()
        restore_signals()  # last: a rank still leaving when torchrun signals it, after another rank ended, exits 75


if __name__ == "__main__":
    run_main(main)
