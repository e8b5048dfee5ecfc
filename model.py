"""CLIP ViT-B/32 written out by hand, the paper's losses, and the small training utilities every stage shares.

Read top to bottom:
  1. CLIPConfig                       -- ViT-B/32 by default (PI paper §3.1), a tiny preset for tests and CPU demos
  2. the network                      -- pre-LN transformer blocks, vision tower, text tower, CLIP
  3. the losses                       -- clip_loss_reference (eq. 3, textbook form) and clip_loss (the same loss,
                                         fused for large batches), cosine_distance (eq. 1), perceptual_hinge_loss
                                         (eq. 2), two_afc_accuracy
  4. checkpoints                      -- plain state dicts, atomic saves, a strict loader with readable errors
  5. training utilities               -- AdamW param groups, cosine schedule, torchrun set-up, JSONL log, the
                                         --resume check, stopping on a signal, args.json, one-line errors

State-dict keys and shapes are those of OpenAI CLIP / open_clip `ViT-B-32` (302 keys, 151,277,313 parameters), so
weights move between this file and theirs with `load_state_dict(strict=True)` in both directions.
"""
import argparse
import dataclasses
import datetime
import errno
import json
import math
import os
import shlex
import signal
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class CLIPConfig:
    # vision tower: ViT-B/32 (PI paper §3.1)
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    # shared embedding space
    embed_dim: int = 512
    # text tower: CLIP's 63M-parameter text transformer
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    # open_clip's `ViT-B-32` uses exact GELU; OpenAI's released weights were trained with QuickGELU
    quick_gelu: bool = False
    # the PI paper (§3.2) initialises the learnable logit scale to ln(100); CLIP's own default is ln(1/0.07)
    logit_scale_init: float = math.log(100.0)
    # which transformer blocks recompute their activations in backward: False, True (all), a fraction of each
    # tower's blocks (the first ones), or "every:K" (blocks 0, K, 2K, ...); see checkpointed_blocks
    grad_checkpointing: bool | float | str = False

    @classmethod
    def tiny(cls, **overrides):
        """A ~170k-parameter CLIP (32-px images, captions of up to 32 tokens) for unit tests and the CPU demo; same
        code path as ViT-B/32. The short context halves the text tower's cost, and the demo's captions fit."""
        cfg = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2, embed_dim=32,
                   text_width=32, text_heads=2, text_layers=2, context_length=32)
        cfg.update(overrides)
        return cls(**cfg)


OPENAI_LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP paper's initial temperature 0.07

# -----------------------------------------------------------------------------------------------------------------
# 2. The network


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose output has its input's dtype, as open_clip's own LayerNorm class.

    CUDA autocast runs layer_norm in fp32 and returns fp32, so with plain nn.LayerNorm every residual stream after the
    first norm would be fp32 on a GPU (twice the activation memory of bf16, and a cast before each matmul). Casting
    back keeps the streams in the autocast dtype; the normalisation itself is still computed in fp32. Without
    autocast the cast is a no-op: fp32 runs, evaluation and the state dict (weight, bias) are unchanged."""

    def forward(self, x):
        return super().forward(x).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection.

    Parameter names (in_proj_weight, in_proj_bias, out_proj) and initialisation are those of nn.MultiheadAttention,
    so state dicts match CLIP's; the computation goes through F.scaled_dot_product_attention, which picks the flash or
    memory-efficient kernel on GPU and never materialises the [L, L] attention matrix there.
    """

    def __init__(self, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: [W_q; W_k; W_v]
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention does
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False):
        B, L, W = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        # [B, L, W] -> [B, heads, L, W/heads]
        q, k, v = (t.view(B, L, self.heads, W // self.heads).transpose(1, 2) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, W))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, quick_gelu):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


def checkpointed_blocks(spec, layers):
    """Which of a tower's `layers` blocks recompute their activations in backward, as a list of bools, from a
    --grad-checkpointing value: False/0 (none), True/1 (all), a fraction f in (0, 1) (the first round(f * layers)
    blocks: in backward they come last, when the other blocks' activations are already freed), or "every:K"
    (blocks 0, K, 2K, ...). Each checkpointed block keeps only its input for backward and runs its forward twice."""
    spec = grad_checkpointing_value(spec)
    if isinstance(spec, str):  # "every:K"
        k = int(spec.split(":")[1])
        return [i % k == 0 for i in range(layers)]
    n = math.floor(float(spec) * layers + 0.5)  # False -> 0 blocks, True -> all of them
    return [i < n for i in range(layers)]


def grad_checkpointing_value(value):
    """A --grad-checkpointing value in canonical form: False, True, a float in (0, 1), or "every:K" (K >= 1). Also
    the flag's argparse type: the error names what it accepts."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("0", "0.0", "false", "off", "none"):
        return False
    if text in ("1", "1.0", "true", "on", "all", "every:1"):
        return True
    if text.startswith("every:") and text[6:].isdigit() and int(text[6:]) >= 1:
        return f"every:{int(text[6:])}"
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    if fraction is None or not 0 < fraction < 1:
        raise argparse.ArgumentTypeError(f"--grad-checkpointing takes 1 (all blocks, also the bare flag), 0, a "
                                         f"fraction of the blocks in (0, 1), or every:K; got {value!r}")
    return fraction


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quick_gelu, causal):
        super().__init__()
        self.causal = causal  # the text tower attends only to earlier tokens
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)])
        self.checkpointed = [False] * layers  # per block; set by CLIP.set_grad_checkpointing

    def forward(self, x):
        for block, ckpt in zip(self.resblocks, self.checkpointed):
            if ckpt and torch.is_grad_enabled():
                # keep only the block input; recompute its activations in backward (~1.33x compute, ~Lx less
                # memory). The blocks draw no random numbers (no dropout), so the RNG state need not be saved.
                x = checkpoint(block, x, self.causal, use_reentrant=False, preserve_rng_state=False)
            else:
                x = block(x, self.causal)
        return x


class VisionTransformer(nn.Module):
    """ViT: 32x32 patches -> [CLS] + 49 tokens -> transformer -> ln_post(CLS) @ proj."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        width, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, cfg.vision_heads, cfg.quick_gelu, causal=False)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def forward(self, images):
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # [B, embed_dim]


class CLIP(nn.Module):
    """Image tower (`visual.*`) and text tower (top-level keys, as in OpenAI's CLIP) sharing one embedding space."""

    def __init__(self, cfg: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.config = cfg
        self.context_length = cfg.context_length  # as OpenAI's and open_clip's CLIP expose it, for the tokenizer
        self.visual = VisionTransformer(cfg)
        # text tower
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.quick_gelu, causal=True)
        self.ln_final = LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))  # log of the inverse temperature
        self._init_text_tower()
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def _init_text_tower(self):
        # OpenAI CLIP's scheme (open_clip agrees); the vision tower keeps PyTorch's defaults, as theirs does.
        width, layers = self.config.text_width, self.config.text_layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def set_grad_checkpointing(self, enable=True):
        """enable: True/False (open_clip's signature), or a fraction / "every:K" (see checkpointed_blocks)."""
        for tower in (self.visual.transformer, self.transformer):
            tower.checkpointed = checkpointed_blocks(enable, len(tower.resblocks))

    def encode_image(self, images, normalize=False):
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):
        if not torch.compiler.is_compiling():
            check_token_ids(tokens, self.config.vocab_size, self.config.context_length)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        if torch.is_autocast_enabled(x.device.type):
            # the embeddings are fp32; the vision stream is bf16 from conv1 on, and this one follows it (open_clip
            # keeps its text stream fp32 under AMP: 12 more fp32 [b, 77, 512] block inputs to keep for backward)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = self.ln_final(self.transformer(x))
        # the sentence feature is the output at the EOT token, the highest id in each row
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, tokens):
        """Returns L2-normalised image and text features and exp(logit_scale), like open_clip's CLIP.forward."""
        image_features = self.encode_image(images, normalize=True)
        return image_features, self.encode_text(tokens, normalize=True), self.logit_scale.exp()


def check_token_ids(tokens, vocab_size, context_length):
    """A clear error for token tensors the text tower cannot take (instead of an index crash inside nn.Embedding)."""
    if tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2:
        raise ValueError(f"token ids must be an integer tensor [batch, length], got {tuple(tokens.shape)} "
                         f"{tokens.dtype}")
    if tokens.shape[1] > context_length:
        raise ValueError(f"token sequences of length {tokens.shape[1]} exceed the model's context_length "
                         f"{context_length}")
    lo, hi = (int(v) for v in torch.aminmax(tokens))  # one small reduction; a host sync on GPU, once per text batch
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids span [{lo}, {hi}] but the model's vocabulary has {vocab_size} entries: the "
                         f"tokenizer (merges file) and CLIPConfig.vocab_size disagree")


# -----------------------------------------------------------------------------------------------------------------
# 3. Losses


class _AllGather(torch.autograd.Function):
    """Concatenate x [b, ...] from every rank along dim 0 -> [world * b, ...]. Backward: each rank computed a
    gradient for the whole gathered tensor, and our slice's total gradient is the sum of those, so the gradients are
    summed over ranks (reduce-scatter) and each rank keeps its own slice.

    Written on the public collectives (all_gather_into_tensor, reduce_scatter_tensor) rather than the deprecated
    torch.distributed.nn.functional.all_gather, whose processes could abort at exit."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        world, rank = dist.get_world_size(), dist.get_rank()
        if dist.get_backend() == "nccl":
            mine = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad)
            return mine
        total = grad.clone()  # gloo has no reduce-scatter; the gathered gradient is small (N x D floats)
        dist.all_reduce(total)
        return total.chunk(world)[rank]


def _all_gather_with_grad(x):
    """Concatenate x from every rank; the backward pass sums the gradients each rank computed for our slice."""
    return _AllGather.apply(x)


class _ContrastiveLogSumExp(torch.autograd.Function):
    """Row and column log-sum-exps of logits = s * I @ T^T, without keeping the logits for backward.

    Autograd would save the [b, N] logits and a softmax per direction (about 4 N^2 floats at peak); this keeps only
    the inputs and the two lse vectors and recomputes the logits in backward, so forward and backward each peak at
    2 N^2 floats. At the paper's 5,120 x 30,720 per GPU that is 1.3 GB instead of 2.5+ GB.
    """

    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale):
        logits = logit_scale * image_features @ text_features.T  # [b, N]
        row_max, col_max = logits.amax(dim=1), logits.amax(dim=0)
        buf = (logits - row_max[:, None]).exp_()  # the one extra N^2 buffer, reused for both directions
        lse_row = buf.sum(dim=1).log_() + row_max  # [b]: log sum_j exp(s I_i.T_j)
        torch.sub(logits, col_max[None, :], out=buf).exp_()
        lse_col = buf.sum(dim=0).log_() + col_max  # [N]: log sum_i exp(s I_i.T_j) over these b images
        ctx.save_for_backward(image_features, text_features, logit_scale, lse_row, lse_col)
        return lse_row, lse_col

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        image_features, text_features, logit_scale, lse_row, lse_col = ctx.saved_tensors
        logits = logit_scale * image_features @ text_features.T  # recomputed
        # d lse_row_i / d l_ij = softmax over j; d lse_col_j / d l_ij = softmax over i
        grad = (logits - lse_row[:, None]).exp_().mul_(grad_row[:, None])
        grad += logits.sub_(lse_col[None, :]).exp_().mul_(grad_col[None, :])
        del logits
        grad_text_dir = grad @ text_features  # [b, D] = sum_j G_ij T_j
        grad_image = logit_scale * grad_text_dir
        grad_text = logit_scale * grad.T @ image_features
        grad_scale = (grad_text_dir * image_features).sum()  # sum_ij G_ij (I_i . T_j)
        return grad_image, grad_text, grad_scale


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE (PI paper eq. 3), equal to `clip_loss_reference` but built for a 30,720-pair batch.

    What it saves, and why: the reference form keeps the [N, N] logits, their transpose's softmax and both
    cross-entropies' softmaxes for backward (about 4 N^2 floats, 15 GB at N = 30,720 in one process). Here one
    logits matrix serves both directions, backward recomputes it instead of storing it (2 N^2 floats at peak), and
    under DDP each rank holds only its [b, N] block (1.3 GB per GPU at the paper's 5,120 x 30,720).

    Features are L2-normalised [b, D] for this rank's b pairs; logit_scale is exp(log-scale).
    Single process: logits = s * I @ T^T is [N, N]; image->text is a row-wise log-softmax, text->image the
    column-wise one of the same matrix (no transposed copy, no second matmul), fused in _ContrastiveLogSumExp.
    Under torch.distributed ("local loss"): each rank only gathers the *text* features and computes the [b, N]
    block of its own images against all N texts. Row log-sum-exps are complete locally. Column log-sum-exps are
    partial (over this rank's images only); their [N] vectors are gathered and combined, so each logit in the
    global N x N matrix is computed exactly once in the whole job. The returned loss covers this rank's b images
    and b texts; its mean over ranks equals the single-process loss on the concatenated batch, and with DDP's
    gradient averaging the parameter gradients are those of one process holding the whole batch.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    image_features, text_features = image_features.float(), text_features.float()  # softmax over 30k logits: fp32
    logit_scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=image_features.device)
    b = image_features.shape[0]
    all_text = _all_gather_with_grad(text_features) if distributed else text_features
    offset = dist.get_rank() * b if distributed else 0  # where this rank's pairs sit in the global batch
    lse_row, lse_col = _ContrastiveLogSumExp.apply(image_features, all_text, logit_scale)  # [b], [N]
    if distributed:  # combine the partial column sums of all ranks: log sum_r exp(lse_r)
        lse_col = torch.logsumexp(_all_gather_with_grad(lse_col[None]), dim=0)
    positives = logit_scale * (image_features * text_features).sum(dim=-1)  # s * <I_i, T_i>, [b]
    image_to_text = lse_row - positives
    text_to_image = lse_col[offset: offset + b] - positives
    return (image_to_text.mean() + text_to_image.mean()) / 2


def clip_loss_reference(image_features, text_features, logit_scale):
    """PI paper eq. 3 as in the CLIP paper's pseudocode: two cross-entropies over one [N, N] logits matrix, single
    process. `clip_loss` computes exactly this (tested equal in value and gradients); this form is here to read."""
    logits = logit_scale * image_features.float() @ text_features.float().T  # [N images, N texts]
    labels = torch.arange(logits.shape[0], device=logits.device)  # pair i is the positive of row i and column i
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def cosine_distance(a, b):
    """PI paper eq. 1: d(x, y) = 1 - cos(f(x), f(y)), row by row."""
    return 1 - F.cosine_similarity(a.float(), b.float(), dim=-1)


def hinge_terms(d0, d1, label, margin=0.05):
    """Per-triplet terms max(0, m - Δd * ȳ) of eq. 2 from the distances d0 = d(x, x~0), d1 = d(x, x~1)."""
    delta_d = d0 - d1
    y_bar = 2 * label.float() - 1
    return torch.clamp(margin - delta_d * y_bar, min=0)


def perceptual_hinge_loss(ref, left, right, label, margin=0.05):
    """PI paper eq. 2 (from Sundaram et al.): mean(max(0, m - Δd * ȳ)).

    ref/left/right: image embeddings [B, D] of x, x~0, x~1. label: [B], 1 when humans judged the RIGHT image x~1
    more similar, 0 when the LEFT x~0 was (NIGHTS' `right_vote` rounded). Δd = d(x, x~0) - d(x, x~1) and ȳ = 2y - 1,
    so the loss pushes the preferred variation closer than the other by at least the margin.
    """
    return hinge_terms(cosine_distance(ref, left), cosine_distance(ref, right), label, margin).mean()


def two_afc_scores(d0, d1, label):
    """Per triplet: 1 when the model picks the image humans picked, 0 when not, 0.5 on a tie. The model picks x~1
    when d(x, x~1) < d(x, x~0). With a soft label p = right_vote this is DreamSim's score (d1<d0)p + (d0<d1)(1-p)."""
    p = label.float()
    return (d1 < d0).float() * p + (d0 < d1).float() * (1 - p) + 0.5 * (d0 == d1).float()


def two_afc_accuracy(ref, left, right, label):
    """Fraction of triplets where the model picks the image humans picked (2AFC; ties count half)."""
    return two_afc_scores(cosine_distance(ref, left), cosine_distance(ref, right), label).mean()


@torch.no_grad()
def triplet_distances(model, batches, device, precision=None):
    """d(x, x~0) and d(x, x~1) (eq. 1) and the label of every NIGHTS triplet in `batches` of (ref, left, right,
    label) as data.NightsTriplets yields them: float32 [N] tensors on `device`. One forward pass of 3B images per
    batch. The one encoding of triplets that stage 1's validation (train_nights.evaluate) and the reported 2AFC
    (evaluate.nights_eval) share; the caller puts the model in eval mode."""
    d0, d1, labels = [], [], []
    for ref, left, right, label in batches:
        with autocast(device, precision):
            f = model.encode_image(torch.cat([ref, left, right]).to(device, non_blocking=True))
        f_ref, f_left, f_right = f.float().chunk(3)
        d0.append(cosine_distance(f_ref, f_left))
        d1.append(cosine_distance(f_ref, f_right))
        labels.append(torch.as_tensor(label).to(device).float())
    if not labels:  # e.g. a DDP rank whose shard of a small split is empty
        return (torch.zeros(0, device=device),) * 3
    return torch.cat(d0), torch.cat(d1), torch.cat(labels)

# -----------------------------------------------------------------------------------------------------------------
# 4. Checkpoints: plain state dicts, written atomically, loaded strictly with errors that name the keys


class CheckpointError(RuntimeError):
    pass


class DiskFullError(OSError):
    """A checkpoint did not fit on its disk; the message names the folder and says what is left of the old file."""

    def __init__(self, message):
        super().__init__(message)
        self.errno = errno.ENOSPC


def _is_disk_full(err):
    """torch.save reports a full disk as a RuntimeError of its zip writer, with the ENOSPC OSError in the chain."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err = err.__cause__ or err.__context__
    return False


def save_checkpoint(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a half-written file
    where a good checkpoint was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".pt")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file 0600; a checkpoint gets what open() would give it
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _is_disk_full(err):
            kept = (f"the previous {os.path.basename(path)} is intact" if os.path.exists(path)
                    else f"nothing was written to {path}")
            raise DiskFullError(f"no space left on device at {folder}; {kept}") from err
        raise


def load_checkpoint(path):
    """Read a checkpoint file into a dict. Also reads OpenAI's released TorchScript archives (ViT-B-32.pt)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        try:  # OpenAI ships its weights as a TorchScript model
            return torch.jit.load(path, map_location="cpu").state_dict()
        except Exception:
            raise CheckpointError(f"could not read checkpoint {path}: {err}") from err


def _plain_state_dict(sd):
    """Accept the wrappers people actually have: {'state_dict': ...} (open_clip), {'model': ...} (our training
    state), DDP's 'module.' prefix, OpenAI's extra integer entries."""
    for key in ("state_dict", "model"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}


def load_state_dict_checked(module, state_dict_or_path, prefix="", what=None, hint=""):
    """Strictly load weights into `module`, raising one CheckpointError that names every missing, unexpected and
    mis-shaped key (after `hint`, e.g. architecture_hint's advice). With prefix="visual.", only the source's
    `visual.*` tensors are used (for `--init nights.pt`)."""
    what = what or (state_dict_or_path if isinstance(state_dict_or_path, str) else "state dict")
    sd = load_checkpoint(state_dict_or_path) if isinstance(state_dict_or_path, str) else state_dict_or_path
    if not isinstance(sd, dict):
        raise CheckpointError(f"{what}: expected a state dict, got {type(sd).__name__}")
    sd = _plain_state_dict(sd)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"{what}: holds no '{prefix}*' tensors")
    expected = module.state_dict()
    missing = [prefix + k for k in expected if k not in sd]
    unexpected = [prefix + k for k in sd if k not in expected]
    shapes = [f"{prefix + k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def show(name, keys):
            return f"\n  {len(keys)} {name}: " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "") if keys else ""
        raise CheckpointError(f"{what} does not match the model ({type(module).__name__})"
                              + (f"; {hint}" if hint else "") + show("missing keys", missing)
                              + show("unexpected keys", unexpected) + show("mis-shaped keys", shapes))
    module.load_state_dict(sd, strict=True)
    return module

# -----------------------------------------------------------------------------------------------------------------
# 5. Training utilities shared by train_nights.py, train_clip.py and finetune_qkv.py


def print0(*message, file=None):
    """print on rank 0 only (every rank runs the same code), through tqdm so that a progress bar stays intact."""
    if int(os.environ.get("RANK", "0")) == 0:
        from tqdm import tqdm
        tqdm.write(" ".join(map(str, message)), file=file or sys.stdout)


def default_precision(device):
    """--precision when it is not given: bf16 on GPU, fp32 on CPU (where bf16 matmuls are slow on most CPUs)."""
    return "bf16" if device.type == "cuda" else "fp32"


def training_state(model, optimizer, step, **extra):
    """Everything `--resume` needs to continue a run exactly: weights, optimiser moments, the step counter, the RNG.
    The scripts add script= (which of them wrote it), args=vars(args) (the recipe --resume checks) and their own."""
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                rng=torch.get_rng_state(), **extra)


# ---- --resume: the same script, the same recipe

# Flags that may change when a run is resumed: how it runs, not what it computes (the sample order does not depend
# on --workers; --accum-steps changes the result by float rounding only). Every other flag is
# the recipe (batch, epochs, lr and schedule, warm-up, data, model, init, seed, precision, ...) and must match.
RESUMABLE_FLAGS = ("workers", "save_every_steps", "stop_after_steps", "dist_timeout", "log_every", "accum_steps",
                   "grad_checkpointing", "compile", "zeroshot", "zeroshot_root")
_NOT_RECIPE = RESUMABLE_FLAGS + ("resume", "out")


class RecipeError(ValueError):
    pass


def _flag(dest):
    return "--" + dest.replace("_", "-")  # every script spells a flag as its destination


def _shown(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else value


def written_by(state):
    """Which script wrote a training state: its `script` entry, or (for states written before there was one) the
    flag only that script has."""
    if state.get("script"):
        return state["script"]
    saved = state.get("args") or {}
    for script, dest in (("finetune_qkv.py", "checkpoint"), ("train_clip.py", "merges"), ("train_nights.py", "subset")):
        if dest in saved:
            return script
    return None


def check_resume(state, args, script, path):
    """Refuse to continue another script's run, or a run under another recipe: one error naming each flag that
    differs, with the run's value (the fix) and this command's. The flags of RESUMABLE_FLAGS may change."""
    other = written_by(state)
    if other and other != script:
        raise CheckpointError(f"{path} is the training state of a {other} run, not of {script}: choose another --out "
                              f"(or continue that run with {other} --resume)")
    saved, now = state.get("args") or {}, vars(args)
    differ = [k for k in now if k in saved and k not in _NOT_RECIPE and now[k] != saved[k]
              and not (k == "precision" and saved[k] is None)]  # older train_clip.py states left it unresolved
    if differ:
        raise RecipeError(f"{path} was trained with another recipe; resume with the run's own values: "
                          + ", ".join(f"{_flag(k)} {_shown(saved[k])} (this command: {_shown(now[k])})"
                                      for k in differ)
                          + "; or start a new run in another --out")


def peek_training_state(path):
    """A training state's small entries (script, args, step) without reading its tensors (mmap)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"could not read {path}: {err}") from err
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        raise CheckpointError(f"{path} is not a training-state checkpoint (needs model, optimizer, step); "
                              f"to start from plain weights use --init instead of --resume")
    return state


def resume_training_state(path, model, optimizer, args=None, script=None):
    """Restore a `training_state` written by save_checkpoint into model and optimizer, after check_resume (when
    args and script are given: before any weight is loaded, so another --model is named as such); returns the whole
    dict (step, epoch, and whatever else the script stored)."""
    state = peek_training_state(path)
    if args is not None:
        check_resume(state, args, script, path)
    state = load_checkpoint(path)  # the tensors in memory, not mapped from a file the run will overwrite
    load_state_dict_checked(model, state["model"], what=f"{path} [model]")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    print0(f"resumed from {path} at step {state['step']}")
    return state


def resuming(resume, state_path, args=None, script=None):
    """Whether to continue the run whose training state is state_path. --resume with no state.pt yet starts the run,
    so one command line serves a job's first submission and all its requeues; without --resume an existing state.pt
    is an error, so a run is never overwritten by accident. With args and script, a state.pt of another script or
    recipe is refused here, before anything is built (check_resume)."""
    if not resume and os.path.exists(state_path):
        try:
            other = written_by(peek_training_state(state_path)) if script else None
        except CheckpointError:  # unreadable: it is still not ours to overwrite
            other = None
        if other and other != script:
            raise FileExistsError(f"{state_path} exists, from a {other} run: choose another --out")
        raise FileExistsError(f"{state_path} exists: pass --resume to continue that run, or choose another --out")
    if resume and not os.path.isfile(state_path):
        print0(f"--resume: no {state_path} yet, starting the run")
        return False
    if resume and args is not None:
        check_resume(peek_training_state(state_path), args, script, state_path)
    return resume


# ---- stopping: a planned stop (--stop-after-steps) or a signal, after a whole step, with state.pt written

PREEMPTED = 75  # exit status after a stop on a signal, state.pt written (sysexits.h's EX_TEMPFAIL: "try again")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SLURM / Kubernetes, SLURM's --signal, Ctrl-C
_stop = []  # the names of the stop signals this process received
_previous_handlers = {}
_main_pid = [None]  # the process that called catch_stop_signals (forked DataLoader workers inherit the handler)
_command = {"argv": None}  # the command line the run was started with (parse_training_args), for resume_command


class Preempted(Exception):
    """A run stopped on a signal after writing state.pt; run_main exits with PREEMPTED."""


def _on_stop_signal(signum, frame):
    if os.getpid() != _main_pid[0]:
        return  # a DataLoader worker: the main process decides, the worker goes on reading
    if _stop and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop at once, state.pt as the last save left it
    _stop.append(signal.Signals(signum).name)
    if len(_stop) == 1 and int(os.environ.get("RANK", "0")) == 0:  # os.write: a print could re-enter an interrupted one
        os.write(2, f"\n{_stop[-1]}: stopping after this step (state.pt will be written; Ctrl-C again stops at "
                    f"once)\n".encode())


def catch_stop_signals():
    """From now until restore_signals(): SIGTERM, SIGUSR1 or Ctrl-C asks the run to stop after its current step
    (stop_reason). Call it before the DataLoader workers start: forked workers inherit the handler, which ignores
    the signal there, so a Ctrl-C (the terminal sends it to every process) leaves them reading. torch's workers
    replace the SIGTERM handler with their own, though: their worker_init_fn is data.worker_ignores_stop_signals."""
    _stop.clear()
    _main_pid[0] = os.getpid()
    for sig in STOP_SIGNALS:
        try:
            _previous_handlers[sig] = signal.signal(sig, _on_stop_signal)
        except ValueError:  # not the main thread: signals stay as they are
            return


def restore_signals():
    for sig, handler in _previous_handlers.items():
        signal.signal(sig, handler)
    _previous_handlers.clear()


def stop_reason(step, stop_after_steps, device):
    """Checked by every rank before each optimiser step (it is a collective: the ranks agree, so they stop at the
    same step). None to go on; else "--stop-after-steps" or the signal's name."""
    asked = bool(_stop)
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([float(asked)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one number per step: cheap next to the step's own all-reduces
        asked = bool(flag.item())
    if stop_after_steps is not None and step >= stop_after_steps:
        return "--stop-after-steps"
    if asked:
        return _stop[0] if _stop else "a signal to another rank"
    return None


def resume_command(script):
    """The command line that continues this run: the one it was started with, --resume added, --stop-after-steps
    dropped (it would stop again at once)."""
    argv, kept = list(_command["argv"] or sys.argv[1:]), []
    while argv:
        arg = argv.pop(0)
        if arg == "--stop-after-steps":
            argv = argv[1:]
        elif not arg.startswith("--stop-after-steps="):
            kept.append(arg)
    kept += [] if "--resume" in kept else ["--resume"]
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    launch = ("python" if world == 1 else f"torchrun --standalone --nproc_per_node {local}" if world == local
              else "torchrun <this job's options>")
    return f"{launch} {shlex.join([script] + kept)}"


def report_stop(reason, step, total_steps, state_path, script):
    """The one line a stopped run prints (rank 0), after state.pt is written. A stop on a signal then raises
    Preempted: run_main turns it into exit status PREEMPTED, so that a job script can tell it from the end."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank exits before rank 0 has written state.pt (torchrun ends the others when one exits)
    why = "planned, resumable" if reason == "--stop-after-steps" else f"on {reason}, resumable"
    print0(f"stopped at step {step} of {total_steps} ({why}); {state_path} written; continue with: "
           f"{resume_command(script)}")
    if reason != "--stop-after-steps":
        raise Preempted(f"stopped at step {step} on {reason}")


# ---- a run's record: args.json, log.jsonl, the warm-up warning, one-line errors


def write_run_record(folder, script, args, loaded=None):
    """args.json beside config.json: the script, its flags as the run uses them (the defaults filled in) and what
    was loaded into the model before training, e.g. {"--init": {"path": ..., "tensors": 152}}. A resumed run
    (loaded=None) keeps what the first start loaded. Rank 0 only; written atomically."""
    path = os.path.join(folder, "args.json")
    if loaded is None and os.path.isfile(path):
        try:
            with open(path) as f:
                loaded = json.load(f).get("loaded")
        except (OSError, ValueError):
            loaded = None
    record = dict(script=script, args=vars(args), loaded=loaded or {})
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def load_init(module, path, flag, prefix="", hint=""):
    """load_state_dict_checked for a flag that loads weights before training (--init, --checkpoint): prints what it
    loaded and returns the entry write_run_record keeps."""
    load_state_dict_checked(module, path, prefix=prefix, what=f"{flag} {path}", hint=hint)
    n = len(module.state_dict())
    print0(f"{flag} loaded {n} tensors{f' ({prefix}*)' if prefix else ''} from {path}")
    return {flag: {"path": path, "tensors": n}}


def warn_long_warmup(warmup_steps, total_steps, flag):
    """A warm-up longer than the run is kept as given (the recipe is the user's), with a warning: the learning rate
    never reaches its peak."""
    if warmup_steps > total_steps:
        print0(f"warning: the warm-up ({flag}) is {warmup_steps} steps, longer than the run's {total_steps}: the "
               f"learning rate reaches only {total_steps / warmup_steps:.0%} of --lr", file=sys.stderr)


# The usual mistakes (a missing or wrong file, a refused resume, a full disk, a bad value) end in one line on stderr;
# TRACEBACK=1 in the environment shows the traceback instead.
USAGE_ERRORS = (CheckpointError, OSError, ValueError, FloatingPointError)


def run_main(main):
    """`if __name__ == "__main__": run_main(main)`. Exit status: 0 done (or a planned stop), 1 an error (one line),
    PREEMPTED stopped on a signal with state.pt written (the line was printed), 130 a second Ctrl-C."""
    script = os.path.basename(sys.argv[0])
    try:
        main()
    except Preempted:
        for sig in STOP_SIGNALS:  # leaving now: torchrun's SIGTERM to the ranks still running must not change that
            signal.signal(sig, signal.SIG_IGN)
        sys.exit(PREEMPTED)
    except KeyboardInterrupt:
        print(f"{script}: interrupted; --resume continues from the last state.pt", file=sys.stderr)
        sys.exit(130)
    except USAGE_ERRORS as err:
        if os.environ.get("TRACEBACK"):
            raise
        message = str(err).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: its last line is the error itself
            message = message.splitlines()[-1]
        print(f"{script}: error: {message}", file=sys.stderr)
        sys.exit(1)


def all_ranks_sum(values, device):
    """Element-wise sum of a list of numbers over all ranks (the numbers themselves in a single process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def check_finite(loss, step, last_checkpoint=None):
    """Stop instead of training on NaN/inf: the message names the step; the last good checkpoint is untouched."""
    if not torch.isfinite(loss).all():
        where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step}{where}")


def adamw(model, lr, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6):
    """AdamW with open_clip's decay rule: decay matrices and embeddings (ndim >= 2), not gains, biases or the
    logit scale. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def cosine_lr(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up to base_lr, then cosine decay to 0; evaluated every optimiser step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Dist:
    """Where this process stands in a torchrun job (the scripts call it dist_env): global rank (which data it reads),
    world size, local rank (which GPU of its node) and its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def autocast(device, precision=None):
    """bf16 autocast (parameters, optimiser state and the loss stay fp32). precision None means bf16 on GPU and fp32
    on CPU, where bf16 matmuls are slow on most processors."""
    precision = precision or default_precision(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def setup_distributed(timeout_minutes=None):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a plain single process. The GPU is the LOCAL
    rank's (the GPUs of this node); the data shard is the GLOBAL rank's (Dist.rank). timeout_minutes: how long a
    collective may wait for the other ranks before the job fails (None: torch's default, 10 minutes for NCCL)."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    timeout = {} if timeout_minutes is None else dict(timeout=datetime.timedelta(minutes=timeout_minutes))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device, **timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **timeout)
    return Dist(rank, world, local, device)


def available_workers():
    """Default DataLoader workers: the cores this process may use (SLURM's and taskset's limits included), shared
    among the ranks torchrun starts on this node, less one for the process itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class JsonlLogger:
    """One JSON object per line (easy to plot with pandas or jq), each with a local time stamp ("time", ISO 8601);
    only rank 0 writes; every line is flushed so nothing is lost when a run dies. A fresh run starts a new file; a
    resumed one (resume=True, step = the step it resumes from) first drops the lines after that step, which the run
    is about to redo, so that each step appears once."""

    def __init__(self, path, enabled=True, resume=False, step=None):
        self.file = None
        if enabled and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if resume and step is not None and os.path.isfile(path):
                self._truncate(path, step)
            self.file = open(path, "a" if resume else "w")

    @staticmethod
    def _truncate(path, step):
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # the half-written last line of a killed run
                    continue
                if not isinstance(record, dict) or record.get("step", -1) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)

    def log(self, **record):
        if self.file:
            record["time"] = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

# -----------------------------------------------------------------------------------------------------------------
# 6. One command-line vocabulary for train_nights.py, train_clip.py, finetune_qkv.py (and evaluate.py's --model)
#
# The same meaning has the same flag in every script. add_run_args holds the flags about running (data, output,
# resume, devices); add_recipe_args the optimisation recipe, whose VALUES differ per stage, so each script passes
# its own defaults together with where each one comes from (the paper's section, or "ours"). Old spellings keep
# working for a while and say what replaced them.

MODEL_PRESETS = {
    "ViT-B-32": CLIPConfig,  # the paper's architecture (§3.1) with exact GELU, as open_clip's `ViT-B-32`
    "ViT-B-32-quickgelu": lambda **kw: CLIPConfig(**{"quick_gelu": True, **kw}),  # OpenAI's released weights
    "tiny": CLIPConfig.tiny,  # tests and the CPU demo
}


def preset_name(name):
    """A preset's canonical name, matched case-insensitively (so the old `vit-b-32` spelling still works). Also
    --model's argparse type: its ValueError becomes a usage error naming the flag."""
    key = {k.lower(): k for k in MODEL_PRESETS}.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    return key


def preset_config(name, **overrides):
    """CLIPConfig of a preset by name."""
    return MODEL_PRESETS[preset_name(name)](**overrides)


def config_from_dict(d, what="config"):
    """A CLIPConfig from a dict: a run's config.json (every field), or a short one that names a preset and changes a
    few fields, e.g. {"model": "tiny", "vocab_size": 1000}. Other keys are an error naming them: a config that
    silently lost a field would build a different model from the one trained."""
    d = dict(d)
    base = dataclasses.asdict(preset_config(d.pop("model"))) if "model" in d else {}
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(CLIPConfig)})
    if unknown:
        raise ValueError(f"{what}: not CLIPConfig fields: {', '.join(unknown)}")
    return CLIPConfig(**{**base, **d})


def _beside(checkpoint):
    """The config.json our scripts write beside every checkpoint (None if there is none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json") if checkpoint else None
    return path if path and os.path.isfile(path) else None


def _vocabulary_of(checkpoint, state_dict=None):
    """(vocab_size, context_length) read from a checkpoint's own token and position embeddings (None where it has
    none): a CLIP trained with a learned BPE has another vocabulary than any preset. mmap: only the two tensors'
    shapes are needed, not the whole file."""
    sd = state_dict
    if sd is None:
        try:
            sd = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return None, None  # not a zip checkpoint (e.g. TorchScript): load_state_dict_checked reports it
    sd = _plain_state_dict(sd) if isinstance(sd, dict) else {}
    tokens, positions = sd.get("token_embedding.weight"), sd.get("positional_embedding")
    return (tokens.shape[0] if tokens is not None else None), (positions.shape[0] if positions is not None else None)


def config_for(checkpoint=None, preset=None, config=None, saved=None, state_dict=None):
    """The architecture to rebuild for a checkpoint, most exact first: a config JSON file (`--config`); the config
    the run recorded (`saved`: the "config" entry of a training state, else the config.json our scripts write beside
    every checkpoint), which describes the weights exactly, a learned vocabulary included; a preset name
    (`--model`, for weights trained elsewhere, e.g. OpenAI's; else ViT-B/32) with the vocabulary and context length
    read from the checkpoint's own embeddings (state_dict, or the file). architecture_hint says which it was."""
    if config:
        if not os.path.isfile(config):
            raise FileNotFoundError(f"--config {config} not found")
        with open(config) as f:
            return config_from_dict(json.load(f), what=config)
    if saved:
        return config_from_dict(saved, what=f"{checkpoint} [config]")
    beside = _beside(checkpoint)
    if beside:
        with open(beside) as f:
            return config_from_dict(json.load(f), what=beside)
    cfg = preset_config(preset or "ViT-B-32")
    vocab, context = _vocabulary_of(checkpoint, state_dict) if checkpoint or state_dict else (None, None)
    return dataclasses.replace(cfg, vocab_size=vocab or cfg.vocab_size, context_length=context or cfg.context_length)


def architecture_hint(checkpoint, preset=None, config=None, saved=None):
    """What to add to a load error when config_for had only a preset to go on: which one, and the two ways out."""
    if config or saved or _beside(checkpoint):
        return ""
    return (f"no config.json beside {checkpoint}, so it was read as --model {preset or 'ViT-B-32'} (with its own "
            f"vocabulary): pass --config <the run's config.json>, or the --model it was trained as")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the script docstring's layout and shows the defaults that are values (not None, not flags)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.help == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _Renamed(argparse.Action):
    """An old spelling of a flag: stores into the new flag's destination and says which flag replaced it."""

    def __init__(self, option_strings, dest, new_flag, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated, use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(p, old, new, dest, type=str):
    p.add_argument(old, dest=dest, type=type, action=_Renamed, new_flag=new, help=argparse.SUPPRESS)


def add_run_args(p, data_help, model="ViT-B-32", save_every_steps=0):
    """Flags about running, the same in every training script."""
    p.add_argument("--data", help=data_help + " (required)")  # checked by parse_training_args: old names count
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", type=preset_name, default=model,
                   help=f"architecture preset: {', '.join(MODEL_PRESETS)}" + ("" if model else "; see --config"))
    p.add_argument("--seed", type=int, default=0, help="model init, data order and augmentation draws")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per process (default: the CPU cores this process may use, shared among "
                        "the node's ranks, less one for the process itself)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="bf16 autocast (default on GPU; fp32 master weights either way) or fp32 (default on CPU)")
    p.add_argument("--grad-checkpointing", type=grad_checkpointing_value, nargs="?", const=True, default=False,
                   metavar="BLOCKS",
                   help="recompute the activations of transformer blocks in backward to save memory: all blocks "
                        "(the bare flag, or 1), the first fraction of each tower's blocks (e.g. 0.5), or every:K "
                        "(blocks 0, K, 2K, ...); `python benchmark.py memory` says which setting fits which GPU")
    p.add_argument("--no-augment", action="store_true", help="train without the §3.4 augmentations")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its state.pt (or start it if there is none yet). Every flag "
                        "must be the run's own (else it is refused, naming each), except these, which may change: "
                        "--workers, --save-every-steps, --stop-after-steps, --dist-timeout, --grad-checkpointing "
                        "(and train_clip.py's --log-every, --accum-steps, --compile, --zeroshot, --zeroshot-root)")
    p.add_argument("--save-every-steps", type=int, default=save_every_steps,
                   help="also write state.pt every N optimiser steps (it is always written after each epoch)")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="write state.pt and stop after this many optimiser steps in total (the schedule still spans "
                        "--epochs); --resume continues exactly where it stopped. For time-limited jobs and tests")
    p.add_argument("--dist-timeout", type=float, default=60.0,
                   help="minutes a rank waits in a collective before the job fails (NCCL's own default is 10, too "
                        "short for the epoch-end work rank 0 does while the others wait)")
    add_renamed(p, "--save-every", "--save-every-steps", "save_every_steps", type=int)
    return p


def parse_training_args(p, argv=None):
    """parse_args, then the checks a renamed flag would slip past (argparse's `required` sees only the new name)."""
    args = p.parse_args(argv)
    _command["argv"] = list(sys.argv[1:] if argv is None else argv)  # for resume_command
    if args.data is None:
        p.error("the following arguments are required: --data")
    if args.workers is None:
        args.workers = available_workers()
    return args


def add_recipe_args(p, **recipe):
    """The optimisation recipe. Each keyword is (default, source): the value and where it comes from, shown in
    --help. Warm-up is given in epochs or in steps (--warmup-epochs / --warmup-steps), whichever the recipe names."""
    def flag(name, type, what):
        if name in recipe:
            default, source = recipe[name]
            p.add_argument("--" + name.replace("_", "-"), type=type, default=default, help=f"{what} ({source})")

    flag("epochs", int, "passes over the training data")
    flag("batch_size", int, "GLOBAL batch: examples per optimiser step summed over all processes")
    flag("lr", float, "peak learning rate")
    flag("weight_decay", float, "AdamW weight decay on matrices and embeddings")
    flag("warmup_epochs", float, "linear warm-up length in epochs; one longer than the run is kept, with a warning")
    flag("warmup_steps", int, "linear warm-up length in optimiser steps; one longer than the run is kept, with a "
                              "warning")
    flag("beta1", float, "Adam beta1")
    flag("beta2", float, "Adam beta2")
    flag("eps", float, "Adam epsilon")
    add_renamed(p, "--wd", "--weight-decay", "weight_decay", type=float)
    return p
