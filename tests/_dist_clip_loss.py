"""Run by tests/test_model.py under `torchrun --nproc_per_node 2` (gloo, CPU): each rank holds half of a fixed batch,
computes clip_loss with gathered features, and writes its loss and feature gradients for the test to compare with a
single process on the whole batch."""
import sys

import torch
import torch.distributed as dist

from model import clip_loss, setup_distributed

out = sys.argv[1]
d = setup_distributed()
g = torch.Generator().manual_seed(0)
N, D = 8, 16
img = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
txt = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
b = N // d.world_size
sl = slice(d.rank * b, (d.rank + 1) * b)
i, t = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
scale = torch.tensor(7.0, requires_grad=True)
loss = clip_loss(i, t, scale)
loss.backward()
torch.save({"loss": loss.detach(), "gi": i.grad, "gt": t.grad, "gs": scale.grad}, f"{out}/rank{d.rank}.pt")
dist.destroy_process_group()
