"""
The perceptual fine-tuning comparison (PI paper §3.3): start from a trained CLIP, unfreeze only the Q, K, V projections
of every attention block of the vision tower (`visual.transformer.resblocks.*.attn.in_proj_weight/bias`; everything
else -- the rest of the ViT, the text tower, the logit scale -- stays frozen), and train 8 epochs of the perceptual
hinge loss (eq. 2) on NIGHTS with AdamW.

--lora R instead follows Sundaram et al. (appendix C.1): the QKV weights stay frozen and a rank-R update
W + (alpha/R)·B·A is trained (R=16, alpha=0.5, lr 3e-4, batch 16, 8 epochs, the epoch with the lowest validation loss
is kept). Every checkpoint this script writes has LoRA merged back into plain `in_proj_weight`s, so it loads into CLIP
like any other.

    python finetune_qkv.py --checkpoint runs/baseline/clip.pt --data /path/to/nights --out runs/ft_qkv
    python finetune_qkv.py --checkpoint runs/baseline/clip.pt --data ... --out runs/ft_lora --lora 16

The model is rebuilt from config.json beside the checkpoint (or --config, or --model). The training loop, evaluation,
checkpointing and --resume are those of train_nights.py; the result is <out>/finetuned.pt.
"""
import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from model import CLIP, CLIPConfig, cleanup_distributed, load_state_dict_checked, setup_distributed
from train_nights import HelpFormatter, add_run_args, train


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the trained CLIP to fine-tune (a plain state dict)")
    p.add_argument("--config", default=None,
                   help="CLIPConfig JSON of the checkpoint (default: config.json beside it, else --model)")
    p.add_argument("--model", choices=["vit-b-32", "tiny"], default="vit-b-32",
                   help="architecture when no config.json is found")
    add_run_args(p)
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="0: train the QKV projections themselves; R > 0: train a rank-R LoRA update of them instead "
                        "(Sundaram et al.: R = 16)")
    p.add_argument("--lora-alpha", type=float, default=0.5, help="LoRA scale alpha (Sundaram et al.: 0.5)")
    # the optimisation recipe: 8 epochs, the margin and AdamW are the PI paper's (§3.3); the rest is Sundaram et al.'s
    p.add_argument("--epochs", type=int, default=8, help="PI paper §3.3 and Sundaram et al.: 8 epochs")
    p.add_argument("--margin", type=float, default=0.05, help="hinge margin m (PI paper §3.1, Sundaram et al.)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="triplets per optimiser step over all GPUs (Sundaram et al.'s 16; the PI paper gives none)")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="learning rate (Sundaram et al.'s 3e-4; the PI paper gives none)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay (ours: 0, as Sundaram et al. use Adam; the PI paper gives none)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up length (ours: none)")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="constant",
                   help="learning-rate schedule (ours: constant; neither paper states one)")
    p.add_argument("--best-by", choices=["val_2afc", "val_loss"], default="val_loss",
                   help="what makes an epoch the best one (Sundaram et al.: lowest validation loss)")
    p.add_argument("--final", choices=["last", "best"], default=None,
                   help="which epoch becomes finetuned.pt (default: best with --lora, as Sundaram et al.; the last of "
                        "the 8 epochs without, as the PI paper §3.3 describes)")
    return p


def is_qkv(name):
    """The fused Q, K, V projection (weight and bias) of a vision attention block."""
    return name.startswith("visual.transformer.resblocks.") and ".attn.in_proj_" in name


class LoRA(nn.Module):
    """A parametrization W -> W + (alpha / r) · B · A (Hu et al. 2021; PEFT's initialisation: A Kaiming-uniform,
    B zero, so training starts exactly at W)."""

    def __init__(self, out_features, in_features, r, alpha):
        super().__init__()
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight):
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


def add_lora(model, r, alpha):
    """Attach LoRA to every vision attention block's in_proj_weight; the original weight becomes
    `...attn.parametrizations.in_proj_weight.original` (frozen by the caller)."""
    for block in model.visual.transformer.resblocks:
        out_features, in_features = block.attn.in_proj_weight.shape
        parametrize.register_parametrization(block.attn, "in_proj_weight", LoRA(out_features, in_features, r, alpha))


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


def load_config(args):
    path = args.config or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return CLIPConfig(**json.load(f))
    if args.config:
        raise FileNotFoundError(f"--config {args.config} not found")
    return CLIPConfig.tiny() if args.model == "tiny" else CLIPConfig()


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.final = args.final or ("best" if args.lora else "last")
    d = setup_distributed()
    try:
        torch.manual_seed(args.seed)  # the LoRA initialisation, identical on every rank
        model = CLIP(load_config(args))
        load_state_dict_checked(model, args.checkpoint)  # a wrong architecture stops here, naming the keys
        if args.lora:
            add_lora(model, args.lora, args.lora_alpha)
        for name, p in model.named_parameters():
            # §3.3: only Q, K, V of every vision attention block are unfrozen (with LoRA: only the LoRA factors)
            p.requires_grad_(".lora_" in name if args.lora else is_qkv(name))
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return train(args, model, d, out_name="finetuned.pt", export=merged_state_dict)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
