"""Run by tests/test_compile.py under `torchrun --nproc_per_node 2` (gloo, CPU): one train_clip.train_step of a tiny
CLIP with every block checkpointed, on this rank's half of a fixed batch of uint8 crops, through the model as
train_clip.wrap_model makes it -- DDP, then either eager or torch.compile around DDP (and the compiled augmentation)
-- with --accum-steps 1 and 2. Rank 0 writes each run's loss and raw parameter gradients, and how many graphs
AOTAutograd compiled for the model (more than one: DDPOptimizer split the graph at DDP's buckets)."""
import sys

import torch
from torch._dynamo.utils import counters

import data
import train_clip
from model import CLIP, CLIPConfig, cleanup_distributed, setup_distributed

out = sys.argv[1]
# a 12,000-token vocabulary (1.5 MB of embedding, no extra compute) and DDP's smallest bucket, 1 MB: the tiny model's
# gradients then fill two buckets, so dynamo splits the graph as it does ViT-B/32's 605 MB into 25 MB buckets
VOCAB, BUCKET_MB = 12000, 1
d = setup_distributed()
torch.manual_seed(0)
init = CLIP(CLIPConfig.tiny(vocab_size=VOCAB, grad_checkpointing=True)).state_dict()
g = torch.Generator().manual_seed(0)
n, b = 8, 4  # global batch, this rank's share
images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)[d.rank * b:(d.rank + 1) * b]
params = torch.stack([data.draw_photometric_params(g) for _ in range(n)])[d.rank * b:(d.rank + 1) * b]
tokens = torch.randint(1, 598, (n, CLIPConfig.tiny().context_length), generator=g)[d.rank * b:(d.rank + 1) * b]
tokens[:, 20] = 599  # EOT
for size in (b, b // 2):  # compile the augmentation first, so that `graphs` below counts the model's graphs only
    train_clip.compiled_device_transform()(images[:size], params[:size])
results = {}
for compile in (False, True):
    raw = CLIP(CLIPConfig.tiny(vocab_size=VOCAB, grad_checkpointing=True))
    raw.load_state_dict(init)
    model = train_clip.wrap_model(raw, d, compile=compile, bucket_cap_mb=BUCKET_MB)
    for accum in (1, 2):
        raw.zero_grad(set_to_none=True)
        before = counters["aot_autograd"]["total"]
        loss = train_clip.train_step(model, images, tokens, accum, torch.autocast("cpu", enabled=False), params=params)
        results[compile, accum] = dict(loss=loss, grads={k: p.grad.clone() for k, p in raw.named_parameters()},
                                       graphs=counters["aot_autograd"]["total"] - before)
if d.is_main:
    torch.save(results, out)
cleanup_distributed()
