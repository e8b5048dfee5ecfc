"""The CPU demo's synthetic world: coloured shapes with captions, written to disk in the formats of the real data.

    python synthetic_world.py world/                      # the default sizes (the flags below), 64-px images
    python synthetic_world.py world/ --n-pairs 30000 --n-retrieval 200 --image-size 32 --seed 1   # demo.py's, seed 1

demo.py and the tests build it (make_synthetic_world); the training and evaluation scripts read what it writes
through the same readers they use for NIGHTS, img2dataset shards, ImageFolder trees and Karpathy JSON (data.py,
evaluate.py).
"""
import argparse
import csv
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import tarfile
import time
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

# A tiny world of flat coloured shapes, written to disk in EXACTLY the formats of the real data, so the CPU demo
# runs the real readers end to end:
#   <root>/nights/data.csv + ref/000/000.png, distort/000/000_0.png, 000_1.png   NIGHTS as distributed with DreamSim
#   <root>/shards/00000.tar, 00001.tar, ...  ({key}.json, {key}.png, {key}.txt)     webdataset shards as img2dataset
#   <root>/zeroshot/{shape,colour,count}/test/<classname>/<i>.png                   ImageFolder trees
#   <root>/zeroshot/tasks.json  {task: {folder, classnames, templates}}              read by evaluate.py --synthetic
#   <root>/retrieval/dataset_synthetic.json + retrieval/images/00000.png           Karpathy split JSON, 5 captions
# A scene is 1-4 copies of ONE shape in ONE colour (so shape, colour and count are each a well-defined class), of
# one size class, placed upright in one region of the image, on a plain neutral background. Captions name exactly
# those three attributes, in varied wording (some with generic nouns, "three shapes", as the zero-shot prompts use).
# Size, region and background are nuisances the captions leave out: every extra attribute a caption names is one
# more that a contrastive model learns before the harder ones (shape takes longest), and with them the tiny model
# did not learn shape within the demo's budget. The shape task's images hold one object each, as its prompts
# ("a photo of a star.") say.
#
# The NIGHTS stand-in. Each triplet is a reference scene and two variations, each making ONE change, and a change
# costs the stand-in observer some perceptual distance:
#   pose 1    (every object turns by 20-45 degrees and shifts slightly)
#   layout 1  (the objects are re-placed in another region of the image)
#   size 2    (the objects grow by 40%, or shrink by as much where grown ones would not fit)
#   colour 3, count 3 (one object added or removed), shape 3
# The variation whose change costs less is the more similar. A pixel distance does not see this rule: moving every
# object (layout) changes far more pixels than recolouring red to orange or adding one small star, so the model
# must learn invariance to where things are and sensitivity to what they are, in three grades. The observers are
# noisy where the costs are close: 6-10 of them vote, each picking the cheaper side with probability 0.8 when the
# costs differ by 1 and 0.94 when they differ by 2 (a logistic in the difference), so some majorities are wrong,
# as in the real NIGHTS. Ties (the same cost on both sides) carry split votes from 3-5 voters, which the reader's
# votes >= 6 filter drops, as it drops NIGHTS' triplets without enough votes. <root>/nights/changes.csv (a sidecar
# the readers ignore) records each side's change, for per-change analysis.
#
# is_imagenet is a category-level flag as in NIGHTS (there: is the prompt's category an ImageNet class); here it
# is True for circle, square and star, so test_imagenet and test_no_imagenet both exist. Splits are 80/10/10,
# stratified on that flag. Everything is a deterministic function of `seed` (numpy Generator); each of the four
# parts has its own child seed, so e.g. changing n_pairs leaves the NIGHTS images byte-identical.


SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLOURS = {"red": (215, 35, 35), "green": (40, 165, 60), "blue": (40, 80, 215),
           "yellow": (235, 205, 30), "purple": (135, 55, 185), "orange": (245, 135, 25)}
COUNTS = ("one", "two", "three", "four")
# object radius as a fraction of the image side: at the demo's 32 px, 5-9 pixels, so that a star and a circle
# differ in more than a pixel or two (four large objects that do not fit are shrunk, see _layout)
SIZES = {"small": (0.15, 0.19), "large": (0.23, 0.29)}
# where the objects' centres may go (x0, y0, x1, y1 in unit coordinates); the NIGHTS layout change moves them
REGIONS = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, 0.5),
           "bottom": (0.0, 0.5, 1.0, 1.0), "centre": (0.25, 0.25, 0.75, 0.75), "anywhere": (0.0, 0.0, 1.0, 1.0)}
BACKGROUNDS = {"white": (242, 242, 242), "grey": (160, 160, 160), "dark": (55, 55, 60), "cream": (236, 226, 202)}
# "noise" and "gradient" backgrounds (drawn by render_scene) are left out of the demo's world: every nuisance
# factor slows the tiny model's learning of shape and count within the demo's budget
TEXTURES = ("plain",)
# what each change costs the stand-in observer (see the section comment)
CHANGE_COST = {"pose": 1, "layout": 1, "size": 2, "colour": 3, "count": 3, "shape": 3}
VOTE_SLOPE = math.log(4)  # a voter picks the closer side with probability sigmoid(VOTE_SLOPE * cost difference)
IMAGENET_SHAPES = ("circle", "square", "star")
SYNTH_NIGHTS_HEADER = ("id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path", "split",
                       "is_imagenet", "prompt")
ZEROSHOT_TASKS_FILE = "tasks.json"  # <root>/zeroshot/tasks.json: {task: {folder, classnames, templates}}
_SUPERSAMPLE = 4  # shapes are drawn as a mask at 4x and box-filtered down: anti-aliased edges for free
_TAR_MTIME = 1_700_000_000  # fixed member time, so the same seed gives byte-identical shards


@dataclass
class Scene:
    shape: str
    colour: str
    size: str
    region: str
    objects: list  # [(x, y, radius, angle_degrees)] in unit coordinates; len(objects) is the count
    background: str
    texture: str
    tone: tuple  # (rgb of the objects after a small jitter, gradient angle, gradient strength, noise sigma)

    @property
    def count(self):
        return COUNTS[len(self.objects) - 1]


@dataclass
class SyntheticWorld:
    root: str
    nights: str  # pass to the NIGHTS reader: <root>/nights (holds data.csv)
    shards: list  # the .tar paths, in order
    shard_pattern: str  # the same as one brace pattern (None without shards), e.g. <root>/shards/{00000..00004}.tar
    zeroshot: dict  # task -> its ImageFolder root <root>/zeroshot/<task>/test
    retrieval_json: str
    retrieval_root: str  # image paths in the JSON are relative to this (filepath "images" + filename)
    counts: dict = field(default_factory=dict)


def synthetic_zeroshot_tasks():
    """{task: (classnames, templates)} for the zero-shot folders. The class names are in the order
    torchvision.datasets.ImageFolder numbers the class folders (sorted), so label i is classnames[i]."""
    return {
        "shape": (sorted(SHAPES), ["a photo of a {}.", "a {} shape.", "a drawing of a {}.",
                                   "a picture with a {} in it."]),
        "colour": (sorted(COLOURS), ["a photo of a {} shape.", "a {} object.", "something {}.", "a drawing in {}."]),
        "count": (sorted(COUNTS), ["a photo of {} objects.", "{} shapes.", "a picture of {} things.",
                                   "there are {} objects in the picture."]),
    }


# ---- scenes ----

_EDGE, _GAP = 0.02, 0.03  # the least margin between an object and the image edge, and between two objects


def _clear(x, y, r, others):
    """Whether an object at (x, y) of radius r keeps _GAP from each of `others` [(x, y, r, angle)]."""
    return all(math.hypot(x - u, y - v) > r + q + _GAP for u, v, q, _ in others)


def _place(rng, radii, region, existing=()):
    """Objects of the given radii, their centres inside `region`, not overlapping each other or `existing`;
    None if they do not fit. They stand upright (angle 0)."""
    x0, y0, x1, y1 = REGIONS[region]
    placed = list(existing)
    for r in radii:
        lo_x, hi_x = max(x0, r + _EDGE), min(x1, 1 - r - _EDGE)  # keep the whole object inside the image
        lo_y, hi_y = max(y0, r + _EDGE), min(y1, 1 - r - _EDGE)
        for _try in range(100):
            x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            if _clear(x, y, r, placed):
                placed.append((x, y, r, 0.0))  # upright: only the NIGHTS pose change turns objects
                break
        else:
            return None
    return placed[len(existing):]


def _fits(objects):
    """Whether every object lies inside the image and clear of the others, by _place's margins."""
    inside = all(r + _EDGE <= v <= 1 - r - _EDGE for x, y, r, _ in objects for v in (x, y))
    return inside and all(_clear(x, y, r, objects[:i]) for i, (x, y, r, _) in enumerate(objects))


def _layout(rng, radii, region):
    """Place objects of the given radii in `region`, falling back to the whole image when they do not fit there,
    and shrinking them a little at a time when four large ones do not fit even there."""
    objects = _place(rng, radii, region)
    while objects is None:
        region, objects = "anywhere", _place(rng, radii, "anywhere")
        radii = [0.9 * r for r in radii]
    return region, objects


def _tone(rng, colour):
    rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[colour])
    return rgb, float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(8, 25)), float(rng.uniform(2, 6))


def random_scene(rng, shape=None, colour=None, count=None):
    """A random scene; shape / colour / count (a word, e.g. "three") may be fixed."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    n = COUNTS.index(count) + 1 if count else int(rng.integers(1, 5))
    size = "small" if rng.random() < 0.5 else "large"
    # one scene in six is scattered over the whole image; the others sit in a named region
    region = "anywhere" if rng.random() < 1 / 6 else list(REGIONS)[rng.integers(5)]
    radii = rng.uniform(*SIZES[size]) * rng.uniform(0.92, 1.08, n)  # one size class, slightly uneven
    region, objects = _layout(rng, [float(r) for r in radii], region)
    return Scene(shape, colour, size, region, objects, list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
                 TEXTURES[rng.integers(len(TEXTURES))], _tone(rng, colour))


def change_scene(rng, scene, change):
    """The reference `scene` with ONE attribute changed: one of CHANGE_COST's keys."""
    if change == "pose":  # turn every object by 20-45 degrees (less than any shape's symmetry) and nudge it
        nudge = lambda v, r: float(np.clip(v + rng.normal(0, 0.015), r, 1 - r))
        objects = [(nudge(x, r), nudge(y, r), r, float(a + rng.choice([-1, 1]) * rng.uniform(20, 45)))
                   for x, y, r, a in scene.objects]
        return replace(scene, objects=objects)
    if change == "layout":  # the objects move to another named region, keeping their sizes and rotations
        others = [g for g in list(REGIONS)[:5] if g != scene.region]
        for _try in range(20):  # regions overlap (bottom / centre): insist that objects move a fifth of the image
            region, moved = _layout(rng, [r for _, _, r, _ in scene.objects], others[rng.integers(len(others))])
            same_size = [r for *_, r, _ in moved] == [r for *_, r, _ in scene.objects]  # a crowded group may shrink
            if same_size and np.mean([math.hypot(x - u, y - v)
                                      for (x, y, *_), (u, v, *_) in zip(moved, scene.objects)]) > 0.2:
                objects = [(x, y, r, a) for (x, y, r, _), (*_, a) in zip(moved, scene.objects)]
                return replace(scene, region=region, objects=objects)
        # a crowded group that fits nowhere else at its size: its centres reflected through the image centre
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
        return replace(scene, region=opposite.get(scene.region, scene.region),
                       objects=[(1 - x, 1 - y, r, a) for x, y, r, a in scene.objects])
    if change == "size":  # every object grows by 40% about its centre if that fits, else shrinks by as much
        grown = [(x, y, 1.4 * r, a) for x, y, r, a in scene.objects]
        if _fits(grown):
            return replace(scene, size="large", objects=grown)
        return replace(scene, size="small", objects=[(x, y, r / 1.4, a) for x, y, r, a in scene.objects])
    if change == "shape":
        return replace(scene, shape=[s for s in SHAPES if s != scene.shape][rng.integers(len(SHAPES) - 1)])
    if change == "colour":
        colour = [c for c in COLOURS if c != scene.colour][rng.integers(len(COLOURS) - 1)]
        return replace(scene, colour=colour, tone=(_tone(rng, colour)[0],) + scene.tone[1:])
    if change == "count":  # add one object in the group's region (or anywhere free), or remove one
        n = len(scene.objects)
        if n < 4 and (n == 1 or rng.random() < 0.5):
            radius = [float(np.mean([r for _, _, r, _ in scene.objects]))]
            for _try in range(12):  # a large lone object may leave no room for a twin: shrink the newcomer to fit
                extra = (_place(rng, radius, scene.region, scene.objects)
                         or _place(rng, radius, "anywhere", scene.objects))
                if extra:
                    return replace(scene, objects=scene.objects + extra)
                radius = [0.85 * radius[0]]
        if n == 1:  # never empty the scene: "no objects" is not a count the world has
            raise RuntimeError("no room for a second object, even a small one")
        drop = rng.integers(n)
        return replace(scene, objects=[o for i, o in enumerate(scene.objects) if i != drop])
    raise ValueError(f"unknown change '{change}'")


def _shape_points(shape, x, y, r, angle):
    """Polygon vertices of `shape` centred at (x, y) with circumradius r, turned by `angle` degrees."""
    if shape == "square":
        polar = [(1.0, 45 + 90 * k) for k in range(4)]
    elif shape == "triangle":
        polar = [(1.0, 90 + 120 * k) for k in range(3)]
    elif shape == "star":
        polar = [(1.0 if k % 2 == 0 else 0.45, 90 + 36 * k) for k in range(10)]
    elif shape == "cross":  # a plus sign with arms 0.6 r wide: the 12 corners by their polar coordinates
        w, polar = 0.3, []
        for k in range(4):
            for dx, dy in ((1.0, -w), (1.0, w), (w, w)):
                polar.append((math.hypot(dx, dy), math.degrees(math.atan2(dy, dx)) + 90 * k))
    else:
        raise ValueError(shape)
    return [(x + r * p * math.cos(math.radians(t + angle)), y - r * p * math.sin(math.radians(t + angle)))
            for p, t in polar]


def render_scene(scene, rng, image_size=64):
    """The scene as an RGB PIL image. rng draws only the background noise, so a variation re-rendered with its
    own noise is never pixel-identical to its reference (as two photographs never are)."""
    big = image_size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for x, y, r, angle in scene.objects:
        cx, cy, cr = x * big, y * big, r * big
        if scene.shape == "circle":
            draw.ellipse((cx - cr, cy - cr, cx + cr, cy + cr), fill=255)
        else:
            draw.polygon(_shape_points(scene.shape, cx, cy, cr, angle), fill=255)
    alpha = np.asarray(mask.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255
    rgb, grad_angle, grad_strength, sigma = scene.tone
    bg = np.broadcast_to(np.array(BACKGROUNDS[scene.background], np.float32), (image_size, image_size, 3)).copy()
    if scene.texture == "gradient":
        t = np.linspace(-0.5, 0.5, image_size, dtype=np.float32)
        bg += grad_strength * (math.cos(grad_angle) * t[None, :, None] + math.sin(grad_angle) * t[:, None, None])
    elif scene.texture == "noise":
        bg += rng.normal(0, sigma, (image_size, image_size, 1)).astype(np.float32)
    img = bg * (1 - alpha) + np.array(rgb, np.float32) * alpha
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


# ---- captions ----

_CAPTION_TEMPLATES = (  # count, colour and shape only: see the section comment
    "{n} {colour} {noun}",
    "a photo of {n} {colour} {noun}",
    "there {is_are} {n} {colour} {noun}",
    "a picture of {n} {noun}, coloured {colour}",
    "{n} {noun} in {colour}",
    "an image showing {n} {colour} {noun}",
    # generic nouns and the singular shape name whatever the count: the words the zero-shot prompts use
    "{n} {colour} {generic} in the shape of a {shape}",
    "a picture of {n} {generic}: {colour} {noun}",
)


def scene_caption(scene, rng, template=None):
    """A natural-language description of the scene; template is an index into _CAPTION_TEMPLATES (random if None)."""
    n = len(scene.objects)
    words = {
        "n": ("a", "one", "a single")[rng.integers(3)] if n == 1 else COUNTS[n - 1],
        "colour": scene.colour, "noun": scene.shape if n == 1 else PLURAL[scene.shape],
        "is_are": "is" if n == 1 else "are", "shape": scene.shape,
        "generic": ("shape", "object")[rng.integers(2)] + ("" if n == 1 else "s"),
    }
    if template is None:
        template = rng.integers(len(_CAPTION_TEMPLATES))
    text = _CAPTION_TEMPLATES[template].format(**words)
    text = re.sub(r"\ba (?=[aeiou])", "an ", text)  # "a orange star" -> "an orange star"
    text = re.sub(r"\s+", " ", text)
    return re.sub(r" (?=[:,])", "", text).strip(" ,")  # an empty "where" leaves stray spaces / a leading comma


# ---- writers ----

def _save_png(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="PNG")


def _stratified_splits(rng, flags):
    """80/10/10 train/val/test, separately within each value of `flags` (so every split has both)."""
    splits = [None] * len(flags)
    for value in (True, False):
        idx = [i for i, f in enumerate(flags) if f == value]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        n_eval = max(1, round(0.1 * len(idx))) if len(idx) >= 3 else 0
        for j, i in enumerate(idx):
            splits[i] = "val" if j < n_eval else "test" if j < 2 * n_eval else "train"
    return splits


def _observer_votes(rng, left_change, right_change):
    """(votes, right_vote) of the stand-in observers: 6-10 voters, each picking the side whose change costs less
    with probability sigmoid(VOTE_SLOPE * difference); on a tie, 3-5 voters split."""
    diff = CHANGE_COST[left_change] - CHANGE_COST[right_change]
    if diff == 0:
        votes = int(rng.integers(3, 6))
        return votes, round(int(rng.integers(1, votes)) / votes, 4)
    votes = int(rng.integers(6, 11))
    p_right = 1 / (1 + math.exp(-VOTE_SLOPE * diff))  # the left change costs more: right is the closer one
    return votes, round(int(rng.binomial(votes, p_right)) / votes, 4)


class _Progress:
    """One line per tenth of a part of the world as it is written (make_synthetic_world(verbose=True)): a full-size
    world takes a minute or more, mostly PNG encoding."""

    def __init__(self, verbose):
        self.verbose, self.t0 = verbose, time.time()

    def __call__(self, part, done, total):
        if self.verbose and (done == total or done % max(1, total // 10) == 0):
            print(f"world: {part} {done:,}/{total:,} ({time.time() - self.t0:.0f} s)", flush=True)


def _write_nights(rng, out, n_triplets, image_size, progress):
    """n_triplets rows with >= 6 votes (what the reader keeps), plus some tied rows (3-5 votes, filtered out)."""
    rows, changes, n_kept = [], [], 0
    while n_kept < n_triplets:
        i = len(rows)
        ref = random_scene(rng)
        kinds = [str(k) for k in rng.choice(list(CHANGE_COST), size=2)]  # [left change, right change]
        votes, right_vote = _observer_votes(rng, *kinds)
        if votes < 6 and rng.random() > 0.1:
            continue  # a tie: 7 draws in 18; one in ten is written, enough to exercise the reader's filter
        left, right = (change_scene(rng, ref, k) for k in kinds)
        n_kept += votes >= 6
        if votes >= 6:
            progress("NIGHTS triplets", n_kept, n_triplets)
        rel = {"ref_path": f"ref/{i // 1000:03d}/{i % 1000:03d}.png",
               "left_path": f"distort/{i // 1000:03d}/{i % 1000:03d}_0.png",
               "right_path": f"distort/{i // 1000:03d}/{i % 1000:03d}_1.png"}
        for key, scene in (("ref_path", ref), ("left_path", left), ("right_path", right)):
            _save_png(render_scene(scene, rng, image_size), os.path.join(out, rel[key]))
        rows.append({"id": i, "left_vote": round(1 - right_vote, 4), "right_vote": right_vote, "votes": votes, **rel,
                     "is_imagenet": ref.shape in IMAGENET_SHAPES, "prompt": scene_caption(ref, rng, template=1)})
        changes.append({"id": i, "left_change": kinds[0], "right_change": kinds[1]})
    ambiguous = [r["votes"] < 6 for r in rows]
    kept = [i for i, amb in enumerate(ambiguous) if not amb]
    for i, split in zip(kept, _stratified_splits(rng, [rows[i]["is_imagenet"] for i in kept])):
        rows[i]["split"] = split
    for i in np.flatnonzero(ambiguous):
        rows[i]["split"] = ("train", "val", "test")[rng.choice(3, p=[0.8, 0.1, 0.1])]
    for name, header, table in (("data.csv", SYNTH_NIGHTS_HEADER, rows),
                                ("changes.csv", ("id", "left_change", "right_change"), changes)):
        with open(os.path.join(out, name), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(table)
    return len(rows)


def _tar_add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), _TAR_MTIME, 0o444, "bigdata", "bigdata"
    tar.addfile(info, io.BytesIO(data))


def _write_shard(job):
    """One img2dataset shard: s.tar with samples keyed f"{s:05d}{j:04d}" (at most 10^4 per shard), the members of a
    sample in webdataset's TarWriter order (sorted extensions), and img2dataset's s_stats.json beside it. Images are
    PNG (img2dataset's --encode_format png): in our trials the tiny model learned shape far less well from JPEGs,
    whose 8x8 blocks coincide with its 8x8 patches at 32 px."""
    seed_seq, out, s, n, image_size = job
    rng = np.random.default_rng(seed_seq)
    with tarfile.open(os.path.join(out, f"{s:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
        for j in range(n):
            key = f"{s:05d}{j:04d}"
            scene = random_scene(rng)
            text = scene_caption(scene, rng)
            png = io.BytesIO()
            render_scene(scene, rng, image_size).save(png, format="PNG")
            meta = {"url": f"synthetic://{key}", "key": key, "status": "success", "error_message": None,
                    "width": image_size, "height": image_size, "original_width": image_size,
                    "original_height": image_size, "caption": text}
            _tar_add(tar, f"{key}.json", json.dumps(meta, indent=4).encode("utf-8"))
            _tar_add(tar, f"{key}.png", png.getvalue())
            _tar_add(tar, f"{key}.txt", text.encode("utf-8"))
    with open(os.path.join(out, f"{s:05d}_stats.json"), "w") as f:
        json.dump({"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0}, f, indent=4)
    return os.path.join(out, f"{s:05d}.tar")


def _write_shards(seed_seq, out, n_pairs, samples_per_shard, image_size, processes, progress):
    """The shards, each from its own child seed, so that `processes` processes can write them at once and the bytes
    do not depend on how many did (default: one per core this process may run on)."""
    if not 1 <= samples_per_shard <= 10_000:
        raise ValueError("samples_per_shard must be in 1..10000 (img2dataset's 4-digit sample index)")
    os.makedirs(out, exist_ok=True)
    n_shards = math.ceil(n_pairs / samples_per_shard)
    jobs = [(child, out, s, min(samples_per_shard, n_pairs - s * samples_per_shard), image_size)
            for s, child in enumerate(seed_seq.spawn(n_shards))]
    processes = min(processes or len(os.sched_getaffinity(0)), n_shards)
    if processes <= 1:
        paths = []
        for job in jobs:
            paths.append(_write_shard(job))
            progress("image-caption shards", len(paths), n_shards)
        return paths
    # spawn, not fork: the caller may hold torch's thread pools, which a forked child must not inherit
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        paths = []
        for path in pool.imap(_write_shard, jobs):  # in order, as they finish
            paths.append(path)
            progress("image-caption shards", len(paths), n_shards)
        return paths


def _write_zeroshot(rng, out, n_test_per_class, image_size):
    dirs, described = {}, {}
    for task, (classnames, templates) in synthetic_zeroshot_tasks().items():
        dirs[task] = os.path.join(out, task, "test")
        for name in classnames:
            for i in range(n_test_per_class):
                # the shape task shows one object, as its prompts ("a photo of a star.") say
                scene = random_scene(rng, **{task: name, **({"count": "one"} if task == "shape" else {})})
                _save_png(render_scene(scene, rng, image_size), os.path.join(dirs[task], name, f"{i}.png"))
        described[task] = {"folder": f"{task}/test", "classnames": classnames, "templates": templates}
    with open(os.path.join(out, ZEROSHOT_TASKS_FILE), "w") as f:  # the evaluator reads the tasks from here
        json.dump(described, f, indent=1)
    return dirs


def _write_retrieval(rng, out, n_retrieval, image_size):
    images, sentid = [], 0
    for i in range(n_retrieval):
        scene = random_scene(rng)
        filename = f"{i:05d}.png"
        _save_png(render_scene(scene, rng, image_size), os.path.join(out, "images", filename))
        # 5 different templates -> 5 distinct captions (the templates differ in their fixed words)
        raws = [scene_caption(scene, rng, template=t) for t in rng.choice(len(_CAPTION_TEMPLATES), 5, replace=False)]
        sentences = [{"raw": r, "tokens": r.replace(",", "").split(), "imgid": i, "sentid": sentid + k}
                     for k, r in enumerate(raws)]
        images.append({"filepath": "images", "filename": filename, "imgid": i, "split": "test",
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
        sentid += 5
    path = os.path.join(out, "dataset_synthetic.json")
    with open(path, "w") as f:
        json.dump({"images": images, "dataset": "synthetic"}, f)
    return path


_PARTS = ("nights", "shards", "zeroshot", "retrieval")
_MARKER = "synthetic_world.json"


def make_synthetic_world(root, seed=0, n_pairs=5000, n_triplets=2000, n_test_per_class=40, n_retrieval=500,
                         image_size=64, samples_per_shard=1000, processes=None, verbose=False):
    """Write the synthetic world under `root` (see the section comment) and return its paths as a SyntheticWorld.

    n_pairs image-caption pairs in shards of samples_per_shard; n_triplets NIGHTS triplets with >= 6 votes (plus
    about n_triplets / 16 tied rows with fewer, which the reader filters out); n_test_per_class images per class of
    each zero-shot task; n_retrieval images with 5 captions each. `processes` write the shards (default: one per
    available CPU core); verbose prints progress as the parts are written. Re-running on a root this function wrote
    replaces its parts; a root holding any of nights/, shards/, zeroshot/, retrieval/ that it did not write is
    refused, so real data is never deleted."""
    marker = os.path.join(root, _MARKER)
    present = [p for p in _PARTS if os.path.exists(os.path.join(root, p))]
    if present and not os.path.isfile(marker):
        raise FileExistsError(f"{root} already holds {', '.join(present)} not written by make_synthetic_world; "
                              f"choose an empty folder")
    for p in present:
        shutil.rmtree(os.path.join(root, p))
    os.makedirs(root, exist_ok=True)
    # one child generator per part: the parts do not shift each other when one's size changes
    seeds = np.random.SeedSequence(seed).spawn(len(_PARTS))
    rngs = [np.random.default_rng(s) for s in seeds]
    progress = _Progress(verbose)
    nights = os.path.join(root, "nights")
    n_rows = _write_nights(rngs[0], nights, n_triplets, image_size, progress)
    shards = _write_shards(seeds[1], os.path.join(root, "shards"), n_pairs, samples_per_shard, image_size, processes,
                           progress)
    zeroshot = _write_zeroshot(rngs[2], os.path.join(root, "zeroshot"), n_test_per_class, image_size)
    progress("zero-shot test images per class", n_test_per_class, n_test_per_class)
    retrieval_root = os.path.join(root, "retrieval")
    retrieval_json = _write_retrieval(rngs[3], retrieval_root, n_retrieval, image_size)
    progress("retrieval images", n_retrieval, n_retrieval)
    args = {"seed": seed, "n_pairs": n_pairs, "n_triplets": n_triplets, "n_test_per_class": n_test_per_class,
            "n_retrieval": n_retrieval, "image_size": image_size, "samples_per_shard": samples_per_shard}
    with open(marker, "w") as f:
        json.dump(args, f, indent=1)
    pattern = os.path.join(root, "shards", f"{{00000..{len(shards) - 1:05d}}}.tar") if shards else None
    return SyntheticWorld(root, nights, shards, pattern, zeroshot, retrieval_json, retrieval_root,
                          counts={"nights_rows": n_rows, **args})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="folder to write the world into (an empty one, or one this script wrote before)")
    p.add_argument("--seed", type=int, default=0, help="every image, caption and vote follows from it (default: 0)")
    p.add_argument("--n-pairs", type=int, default=5000, help="image-caption pairs in the tar shards (default: 5000)")
    p.add_argument("--n-triplets", type=int, default=2000,
                   help="NIGHTS-style triplets with at least 6 votes (default: 2000)")
    p.add_argument("--n-test-per-class", type=int, default=40,
                   help="test images per class of each zero-shot task (default: 40)")
    p.add_argument("--n-retrieval", type=int, default=500,
                   help="retrieval images, 5 captions each (default: 500)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64; the demo uses 32)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="pairs per tar shard (default: 1000)")
    p.add_argument("--processes", type=int, default=None,
                   help="processes writing the shards (default: one per available core)")
    args = p.parse_args(argv)
    world = make_synthetic_world(args.root, seed=args.seed, n_pairs=args.n_pairs, n_triplets=args.n_triplets,
                                 n_test_per_class=args.n_test_per_class, n_retrieval=args.n_retrieval,
                                 image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                                 processes=args.processes, verbose=True)
    print(f"NIGHTS folder: {world.nights}\nshards: {world.shard_pattern}\n"
          f"zero-shot tasks: {os.path.join(world.root, 'zeroshot')}\nretrieval JSON: {world.retrieval_json}")
    return world


if __name__ == "__main__":
    main()
