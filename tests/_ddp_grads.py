"""Run by tests/test_clip_training.py, alone or under `torchrun --nproc_per_node 2` (gloo, CPU): one
train_clip.train_step of a tiny CLIP on the first global batch of a CSV -- uint8 crops augmented by device_transform,
through DDP when there are 2 ranks -- after which rank 0 writes the raw parameter gradients (no optimiser step)."""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import train_clip
from model import CLIP, CLIPConfig, cleanup_distributed, setup_distributed

csv_path, merges, out = sys.argv[1], sys.argv[2], sys.argv[5]
batch_size, accum_steps = int(sys.argv[3]), int(sys.argv[4])
d = setup_distributed()
tokenizer = data.Tokenizer(merges)
torch.manual_seed(0)
model = CLIP(CLIPConfig.tiny(vocab_size=tokenizer.vocab_size))
ddp = DDP(model) if d.world_size > 1 else model
loader = data.image_text_loader(csv_path, tokenizer, 32, batch_size, rank=d.rank, world_size=d.world_size, workers=0,
                                context_length=model.context_length)
batches = loader.batches()
batch = next(batches)
batches.close()
train_clip.train_step(ddp, batch["images"], batch["tokens"], accum_steps, torch.autocast("cpu", enabled=False),
                      params=batch["params"])
if d.is_main:
    torch.save({name: p.grad for name, p in model.named_parameters()}, out)
del ddp  # DDP's reducer goes before the process group it holds, not after it at interpreter exit
cleanup_distributed()
