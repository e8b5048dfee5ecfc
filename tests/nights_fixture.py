"""A small NIGHTS-layout folder with a learnable rule, for the tests (no network).

Each image is a random grey-level block pattern (its own in every image) tinted with a colour. The "humans" prefer the
variation whose tint has the reference's RED component and random green and blue; the other variation keeps the
reference's green and blue but shifts its red. Whole-colour or pixel distance is no guide to the label (pixel-space
2AFC about 0.46; a random tiny CLIP scores 0.34-0.71 depending on the init seed, 0.50 with the seed the tests use), so
a model has to learn to weigh red and ignore green and blue.

data.csv carries extra columns (prompt, seed_ref, comment) in an order unlike the reference file's, so only a loader
that reads columns by name passes.
"""
import csv
import os

import numpy as np
from PIL import Image

COLUMNS = ("prompt", "split", "right_path", "id", "votes", "left_path", "seed_ref", "right_vote", "ref_path",
           "is_imagenet", "left_vote", "comment")


def _image(pattern, tint, size):
    lum = np.kron(pattern, np.ones((size // pattern.shape[0], size // pattern.shape[1])))  # blocks -> pixels
    return Image.fromarray((lum[..., None] * tint * 255).astype(np.uint8))


def make_nights(root, counts=None, size=40, blocks=4, seed=0, low_vote_rows=3):
    """Write <root>/data.csv and the PNGs it names. counts: {split: n} with split in train/val/test; test rows
    alternate is_imagenet True/False. Adds `low_vote_rows` rows per split with votes < 6 (they must be dropped) whose
    image files do not exist (so a loader that kept them would fail)."""
    counts = counts or {"train": 64, "val": 32, "test": 16}
    rng = np.random.default_rng(seed)
    rows, tid = [], 0
    for split, n in counts.items():
        for k in range(n + low_vote_rows):
            low = k >= n
            folder = f"{tid // 100:03d}"
            ref_p, left_p, right_p = (f"ref/{folder}/{tid:03d}.png", f"distort/{folder}/{tid:03d}_0.png",
                                      f"distort/{folder}/{tid:03d}_1.png")
            right_better = int(rng.integers(2))
            if not low:
                patterns = rng.uniform(0.4, 1.0, (3, blocks, blocks))
                tints = rng.uniform(0.2, 1.0, (3, 3))  # reference, similar, dissimilar
                tints[1, 0] = tints[0, 0]  # similar: the reference's red, random green and blue
                tints[2, 1:] = tints[0, 1:]  # dissimilar: the reference's green and blue, red 0.25-0.45 away
                tints[2, 0] = (tints[0, 0] - 0.2 + rng.uniform(0.25, 0.45)) % 0.8 + 0.2
                ref, similar, dissimilar = (_image(p, t, size) for p, t in zip(patterns, tints))
                left, right = (dissimilar, similar) if right_better else (similar, dissimilar)
                for p, im in ((ref_p, ref), (left_p, left), (right_p, right)):
                    os.makedirs(os.path.dirname(os.path.join(root, p)), exist_ok=True)
                    im.save(os.path.join(root, p))
            rows.append({"id": tid, "left_vote": 1.0 - right_better, "right_vote": float(right_better),
                         "votes": 3 if low else int(rng.integers(6, 11)), "ref_path": ref_p, "left_path": left_p,
                         "right_path": right_p, "split": split, "is_imagenet": str(tid % 2 == 0),
                         "prompt": f"a picture number {tid}", "seed_ref": tid * 7, "comment": ""})
            tid += 1
    with open(os.path.join(root, "data.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows
