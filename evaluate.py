"""
Evaluate a CLIP checkpoint the way the PI paper does: zero-shot classification on its 29 datasets (Table 1, Figure 2),
Flickr30k / COCO retrieval (Table 2), scaling curves over a run's checkpoints (Figures 3-4), NIGHTS 2AFC, and
perceptual probes (TID2013, texture-shape bias, noise sensitivity).

    python evaluate.py --checkpoint runs/pi/epoch_32.pt --merges bpe_simple_vocab_16e6.txt.gz \
        --data-root /data/eval --datasets all --retrieval flickr30k,coco --nights /data/nights \
        --out results/pi --compare runs/base/epoch_32.pt
    python evaluate.py --scaling runs/pi,runs/base --samples-per-epoch 15000000 --merges ... --data-root ... \
        --datasets all --out results/scaling
    python evaluate.py --checkpoint demo_out/seed_0/pi/epoch_10.pt --compare demo_out/seed_0/baseline/epoch_10.pt \
        --model tiny --merges ... --datasets "" --retrieval "" --synthetic demo_out/seed_0/world  # the CPU demo

From training code: zero_shot_eval(model, tokenizer, "imagenet1k", dataset_root(data_root, "imagenet1k")),
retrieval_eval(model, tokenizer, json_or_wds_folder), nights_eval(model, nights_root), folder_zero_shot_eval(...),
synthetic_eval(model, tokenizer, world_root).

Everything reads from one folder per dataset under --data-root: the set's raw files, or its webdataset copy as
clip_benchmark and DataComp publish them (wds_<name>/, read with tarfile), which is used ahead of the raw files when
both are there. Layout (torchvision's own wherever torchvision has the set; this table is layout_table(), printed
from BENCHMARKS, and a test keeps this copy and README.md's equal to it):

    imagenet1k                     imagenet1k/val/<wnid>/*.JPEG, or imagenet1k/: torchvision ImageNet(split='val')
    imagenet-a                     imagenet-a/<wnid>/*.jpg (the released tar, extracted)
    imagenet-o                     imagenet-o/<wnid>/*.jpg (the released tar, extracted)
    imagenet-r                     imagenet-r/<wnid>/*.jpg (the released tar, extracted)
    imagenet_sketch                imagenet_sketch/[sketch/]<wnid>/*.JPEG (the zip, extracted)
    imagenetv2                     imagenetv2/[ImageNetV2-matched-frequency/]<0..999>/*.jpeg
    objectnet                      objectnet/objectnet-1.0/{images,mappings}/
    cifar100                       cifar100/: torchvision CIFAR100(train=False)
    caltech101                     caltech101/[caltech101/]101_ObjectCategories/<class>/*.jpg
    clevr_closest_object_distance  clevr/[clevr/]CLEVR_v1.0/{images/val/, scenes/CLEVR_val_scenes.json}
    clevr_count_all                clevr/ (as clevr_closest_object_distance)
    kitti_closest_vehicle_distance kitti/[Kitti/raw/]training/{image_2,label_2}/ (+ optional kitti/test_ids.txt)
    dtd                            dtd/: torchvision DTD(split='test')
    eurosat                        eurosat/: torchvision EuroSAT() (a fixed 20% of it)
    flowers                        flowers/: torchvision Flowers102(split='test')
    pets                           pets/: torchvision OxfordIIITPet(split='test', target_types='category')
    resisc45                       resisc45/[NWPU-RESISC45/]<class>/*.jpg
    svhn                           svhn/: torchvision SVHN(split='test')
    pcam                           pcam/: torchvision PCAM(split='test')
    cars                           cars/: torchvision StanfordCars(split='test')
    food101                        food101/: torchvision Food101(split='test')
    fgvc_aircraft                  fgvc_aircraft/: torchvision FGVCAircraft(split='test', annotation_level='variant')
    voc2007                        voc2007/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main/test.txt}
    cifar10                        cifar10/: torchvision CIFAR10(train=False)
    country211                     country211/: torchvision Country211(split='test')
    gtsrb                          gtsrb/: torchvision GTSRB(split='test')
    mnist                          mnist/: torchvision MNIST(train=False)
    renderedsst2                   renderedsst2/: torchvision RenderedSST2(split='test')
    stl10                          stl10/: torchvision STL10(split='test')
    flickr30k                      flickr30k/dataset_flickr30k.json + images in flickr30k/[flickr30k-images/|images/]
    coco                           coco/dataset_coco.json + coco/val2014/*.jpg (Karpathy JSON, `filepath` field)
    tid2013                        tid2013/{mos_with_names.txt, reference_images/, distorted_images/}
    cue_conflict                   cue-conflict/<shape>/<shape>N-<texture>M.png (Geirhos et al.)
    noise                          CIFAR-100-C/{gaussian_noise.npy, labels.npy} (+ cifar100/ for the clean accuracy)

    The webdataset copies, read instead of the files above wherever they are present: <data-root>/wds_<name>/
    (clip_benchmark) or wds_<name>_test/ (DataComp), <name> one of imagenet1k, imagenet-a, imagenet-o, imagenet-r,
    imagenet_sketch, imagenetv2, objectnet, vtab-cifar100, vtab-caltech101, vtab-clevr_closest_object_distance,
    vtab-clevr_count_all, vtab-kitti_closest_vehicle_distance, vtab-dtd, vtab-eurosat, vtab-flowers, vtab-pets,
    vtab-resisc45, vtab-svhn, vtab-pcam, cars, food101, fgvc_aircraft, voc2007, cifar10, vtab-cifar10, country211,
    gtsrb, mnist, renderedsst2, stl10, flickr30k, mscoco_captions.

Each result says which files (`path`) and which test split (`split`) were read. The webdataset copies of the VTAB
sets hold VTAB's own test splits (from TFDS). From the raw files, where a VTAB split cannot be rebuilt without TFDS
(EuroSAT, RESISC45, Caltech-101, KITTI), a fixed split of the same size is used and named. Class names and templates
are ours (clip_benchmark's, zeroshot_prompts.json); where a copy's classnames.txt differs, the report says where.
Every set is scored over all of its classes: one whose images cover fewer (a partial download) is flagged
`incomplete`, never scored as a smaller task. A set whose files are missing, or that fails in any way, is recorded
as skipped with the reason and the path, and the run goes on; a single unreadable image is skipped and counted
(n_unreadable). results.json is rewritten after every benchmark, so a killed run keeps what it measured; an earlier
results.json in --out is never replaced without --overwrite, and a run that measures nothing exits with an error.
#test in the tables is always the number of images actually evaluated. Accuracies and recalls are in percent.
"""

import argparse
import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from tqdm import tqdm

import data
from model import (CLIP, MODEL_PRESETS, HelpFormatter, add_renamed, autocast, config_for, load_checkpoint,
                   load_state_dict_checked, preset_name, save_checkpoint, triplet_distances, two_afc_scores)

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")

# -----------------------------------------------------------------------------------------------------------------
# 1. Metrics


def topk_hits(logits, targets, k):
    """Per row: 1 when the target is among the k highest logits, 0 when not. Ties are split evenly: a target tied
    with e classes (itself included) behind g strictly higher ones scores (k - g) / e, clipped to [0, 1], which is
    the expected top-k under random tie-breaking (a constant model gets k/C, not 0 or 1)."""
    target_logit = logits.gather(1, targets.view(-1, 1))
    greater = (logits > target_logit).sum(1).float()
    equal = (logits == target_logit).sum(1).float()
    return ((k - greater) / equal).clamp(0, 1)


def topk_accuracy(logits, targets, k):
    """Fraction of rows whose target is among the k highest logits (ties split as in topk_hits). Without ties this
    is the usual top-k; k >= #classes gives 1."""
    return topk_hits(logits, targets, k).mean().item()


def mean_per_class_recall(logits, targets):
    """Top-1 recall of each class that has test images, averaged over those classes: clip_benchmark's
    `mean_per_class_recall` (sklearn's balanced accuracy), which DataComp reports for Caltech-101, FGVC-Aircraft,
    Flowers and Pets, where classes differ a lot in size. Ties are split as in topk_hits."""
    n_classes = logits.shape[1]
    hits = torch.zeros(n_classes).index_add_(0, targets, topk_hits(logits, targets, 1))
    count = torch.bincount(targets, minlength=n_classes).float()
    return (hits[count > 0] / count[count > 0]).mean().item()


def recall_at_k(scores, positives, k):
    """Retrieval R@K as CLIP papers and clip_benchmark compute it: a query scores 1 when at least one of its
    positives is among its k best-scoring candidates (so an image counts as found by any of its 5 captions).
    scores, positives: [queries, candidates]."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return positives.gather(1, top).any(dim=1).float().mean().item()


def retrieval_metrics(image_emb, text_emb, text_to_image, ks=(1, 5, 10)):
    """I->T and T->I R@K (percent) from unit-norm embeddings; text_to_image[j] is the image index of caption j."""
    scores = text_emb @ image_emb.t()  # [texts, images]
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(text_to_image)), torch.as_tensor(text_to_image)] = True
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100 * recall_at_k(scores.t(), positives.t(), k)
        out[f"t2i_r{k}"] = 100 * recall_at_k(scores, positives, k)
    return out


def pearson(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))


def rankdata(x):
    """1-based ranks with ties given their average rank (scipy.stats.rankdata's default)."""
    x = np.asarray(x)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="mergesort")] = np.arange(1, len(x) + 1)
    _, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


def spearman(x, y):
    return pearson(rankdata(x), rankdata(y))


def fit_power_law(n, acc):
    """acc = a * n**beta, fitted by least squares on log(acc) = log(a) + beta * log(n) (PI paper Figures 3-4).
    Points with acc <= 0 have no logarithm and are left out; None when fewer than two points remain."""
    n, acc = np.asarray(n, np.float64), np.asarray(acc, np.float64)
    keep = (n > 0) & (acc > 0)
    if keep.sum() < 2:
        return None
    beta, log_a = np.polyfit(np.log(n[keep]), np.log(acc[keep]), 1)
    return {"a": float(np.exp(log_a)), "beta": float(beta), "points": int(keep.sum())}

# -----------------------------------------------------------------------------------------------------------------
# 2. Encoding: images once per dataset in big batches, bf16 autocast on GPU; an unreadable image is skipped, counted


class DatasetUnavailable(Exception):
    """A benchmark's files are missing or unreadable: the run records it as skipped and goes on."""


class Unreadable(str):
    """Stands in for a dataset item that could not be read; the string says which and why."""


class Readable(Dataset):
    """A dataset whose items that cannot be read (a 0-byte or truncated image, a file that is not there) come back as
    Unreadable instead of raising, so that one bad file costs one image, not its whole set."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return self.ds[i]
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
            return Unreadable(f"{item_path(self.ds, i)}: {type(e).__name__}: {e}")


def item_path(ds, i):
    """The file behind item i where the dataset keeps a list of them, else its index."""
    if isinstance(getattr(ds, "items", None), list):
        return ds.items[i][0]
    if isinstance(getattr(ds, "paths", None), list):
        return ds.paths[i]
    return f"item {i}"


def collate_readable(batch):
    """(the readable items collated as usual, or None if there are none; [the Unreadable ones])."""
    good = [b for b in batch if not isinstance(b, Unreadable)]
    return (default_collate(good) if good else None), [b for b in batch if isinstance(b, Unreadable)]


def make_loader(ds, batch_size, workers, device):
    """Batches of (readable items, unreadable reasons); read them through `readable_batches`."""
    return DataLoader(Readable(ds), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False, collate_fn=collate_readable)


def readable_batches(loader, unreadable, desc="images"):
    """The readable part of each batch of a make_loader loader; the reasons for the others go into `unreadable`."""
    for batch, bad in tqdm(loader, desc=desc, leave=False, disable=None):
        unreadable.extend(bad)
        if batch is not None:
            yield batch


@torch.no_grad()
def encode_images(model, loader, device, desc="images"):
    """Unit-norm float32 image embeddings [N, D] (on CPU) and the items' second field stacked [N], for the N readable
    items of a make_loader loader, and the list of the unreadable ones. DatasetUnavailable if none is readable."""
    feats, labels, unreadable = [], [], []
    for images, y in readable_batches(loader, unreadable, desc):
        with autocast(device):
            f = model.encode_image(images.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=-1).cpu())
        labels.append(torch.as_tensor(y))
    if not feats:
        raise DatasetUnavailable(f"none of the {len(unreadable)} images could be read, e.g. {unreadable[:1]}")
    return torch.cat(feats), torch.cat(labels), unreadable


def unreadable_record(unreadable, shown=5):
    """What results.json keeps about skipped images: how many, and the first few with their reasons."""
    return {"n_unreadable": len(unreadable), "unreadable": unreadable[:shown]} if unreadable else {}


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, batch_size=1024):
    """Unit-norm float32 text embeddings [len(texts), D] (on CPU)."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i:i + batch_size], context_length=model.context_length).to(device)
        with autocast(device):
            f = model.encode_text(tokens)
        out.append(F.normalize(f.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, templates, device, batch_size=1024):
    """CLIP's prompt ensembling (Radford et al. 2021, §3.1.4; clip_benchmark's zero_shot_classifier): for each
    class, encode every template filled with the class name, L2-normalise each, average, re-normalise.
    Returns [D, C] so that logits = 100 * image_emb @ classifier."""
    texts = [t.format(c, c=c) for c in classnames for t in templates]  # "{c}" (clip_benchmark) or "{}" templates
    emb = encode_texts(model, tokenizer, texts, device, batch_size)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1).t().contiguous()


def cached_classifier(model, tokenizer, classnames, templates, device, cache_dir=None, cache_tag=None):
    """The text classifier of one (checkpoint, class list, templates), kept on disk when a cache is given: it is the
    slow part for ImageNet's 1000 x 80 prompts, and ImageNet, -V2 and -Sketch share it."""
    if not (cache_dir and cache_tag):
        return zero_shot_classifier(model, tokenizer, classnames, templates, device)
    key = hashlib.sha1(json.dumps([cache_tag, classnames, templates]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"classifier-{key}.pt")
    if os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    clf = zero_shot_classifier(model, tokenizer, classnames, templates, device)
    save_checkpoint(clf, path)  # atomic: another evaluation sharing the cache never reads half a file
    return clf

# -----------------------------------------------------------------------------------------------------------------
# 3. Reading the datasets: torchvision where it has the set, a small reader for each of the others


class RGB:
    """Grayscale or palette images (MNIST, some ImageNet files) become 3-channel before the model transform."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(img.convert("RGB"))


class ImageList(Dataset):
    """(path, label) or (path, label, crop box) items, read as RGB."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label, *box = self.items[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
        if box:
            img = img.crop(box[0])
        return self.transform(img), label


class ArrayImages(Dataset):
    """uint8 [N, H, W, 3] images in memory (CIFAR-100-C's .npy files)."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def find_dir(root, *candidates):
    """The first of root/candidate that exists; FileNotFoundError naming them all otherwise."""
    paths = [os.path.join(root, c) for c in candidates]
    for p in paths:
        if os.path.isdir(p):
            return p
    raise FileNotFoundError("none of " + ", ".join(paths))


def list_images(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def class_folders(root):
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def folder_items(root, label_of_folder):
    """(path, label) for every image in root/<folder>/ whose folder has a label."""
    return [(p, label_of_folder[d]) for d in class_folders(root) if d in label_of_folder
            for p in list_images(os.path.join(root, d))]


def fixed_subset(items, fraction, seed=0):
    """A fixed random subset (same on every machine): stands in for a VTAB test split (the last 20% of TFDS's own
    ordering) that cannot be rebuilt without TFDS. Same size, not the same images."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(items), generator=g)[:round(fraction * len(items))].sort().values
    return [items[i] for i in keep.tolist()]


def imagenet_names():
    p = prompts()
    return dict(zip(p["_imagenet1k_wnids"], p["imagenet1k"]["classes"]))


# Every reader takes (root = <data-root>/<folder>, image transform, download) and returns (dataset of (image, label),
# its class names or None for zeroshot_prompts.json's list, a note on the split). It raises OSError / ValueError /
# KeyError when files are missing or malformed; the caller records that for the set and goes on.


@dataclass
class Torchvision:
    """A set torchvision reads itself: torchvision.datasets.<name>(root, **kwargs), with torchvision's class list
    (clip_benchmark uses the same) unless zeroshot_prompts.json gives one."""
    name: str
    kwargs: dict
    spaces: bool = False  # class names with '_' -> ' ' (clip_benchmark's Food-101)

    def __call__(self, root, transform, download):
        import torchvision.datasets as tvd
        ds = getattr(tvd, self.name)(root=root, transform=RGB(transform), download=download, **self.kwargs)
        classes = [c.replace("_", " ") for c in ds.classes] if self.spaces else ds.classes
        return ds, classes, "test"

    def layout(self, folder):
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{folder}/: torchvision {self.name}({args})"


def read_imagenet1k(root, transform, download):
    if os.path.isdir(os.path.join(root, "val")):
        wnids = prompts()["_imagenet1k_wnids"]
        return ImageList(folder_items(os.path.join(root, "val"), {w: i for i, w in enumerate(wnids)}), transform), \
            None, "val"
    if os.path.exists(os.path.join(root, "ILSVRC2012_devkit_t12.tar.gz")):
        import torchvision.datasets as tvd
        return tvd.ImageNet(root, split="val", transform=RGB(transform)), None, "val"  # unpacks the archives once
    raise FileNotFoundError(f"neither {root}/val/<wnid>/ nor torchvision ImageNet's archives in {root}")


def set_wnids(name):
    """The wnids that are set `name`'s classes, in ImageNet order: ImageNet-A's, -O's or -R's 200 (clip_benchmark's
    lists, kept in zeroshot_prompts.json), else all 1000."""
    p = prompts()
    return p.get(f"_{name}_wnids", p["_imagenet1k_wnids"])


def read_wnid_folders(root, transform, download, name="imagenet_sketch"):
    """ImageNet-A/-O/-R/-Sketch: one folder per wnid, labelled by the wnid's place in the set's whole class list (200
    or 1000 wnids, named as in ImageNet, as clip_benchmark masks ImageNet's list). All of the set's classes are scored
    whichever folders are there, so a partial download is not a smaller, easier task (zero_shot_on flags it)."""
    names, wnids = imagenet_names(), set_wnids(name)
    folder = find_dir(root, "sketch", "")
    unknown = sorted(set(class_folders(folder)) - set(wnids))
    if unknown:
        raise ValueError(f"{folder} has class folders that are not {name} wnids: {', '.join(unknown[:5])}")
    return ImageList(folder_items(folder, {w: i for i, w in enumerate(wnids)}), transform), \
        [names[w] for w in wnids], "test"


def read_imagenetv2(root, transform, download):
    """Matched-frequency ImageNet-V2 in clip_benchmark's layout (ImageNetV2-matched-frequency/) or the release
    tarball's (imagenetv2-matched-frequency-format-val/); folders are class indices, not ImageFolder's order."""
    folder = find_dir(root, "ImageNetV2-matched-frequency", "imagenetv2-matched-frequency-format-val", "")
    items = folder_items(folder, {str(i): i for i in range(1000)})
    return ImageList(items, transform), prompts()["imagenet1k"]["classes"], "test"


def read_objectnet(root, transform, download):
    """ObjectNet's 113 classes that map onto ImageNet, named and ordered as clip_benchmark (from wise-ft) does."""
    base = find_dir(root, "objectnet-1.0", "")
    with open(os.path.join(base, "mappings", "folder_to_objectnet_label.json")) as f:
        folder_to_label = json.load(f)
    with open(os.path.join(base, "mappings", "objectnet_to_imagenet_1k.json")) as f:
        in_imagenet = set(json.load(f))
    folders = sorted(d for d, lab in folder_to_label.items() if lab in in_imagenet)
    items = folder_items(os.path.join(base, "images"), {d: i for i, d in enumerate(folders)})
    return ImageList(items, transform), [folder_to_label[d].lower() for d in folders], "test"


def read_caltech101(root, transform, download, n_train=30):
    """All 102 folders (with BACKGROUND_Google, as VTAB and the paper's #classes) in case-sensitive order; the test
    split is everything but the first 30 images of each class, VTAB's split rule (TFDS draws its 30 at random)."""
    folder = find_dir(root, "caltech101/101_ObjectCategories", "101_ObjectCategories")
    folders = class_folders(folder)
    if len(folders) != 102:  # a label is a place in the folder order: with folders missing, later labels would shift
        raise ValueError(f"{folder} has {len(folders)} class folders, Caltech-101 102 (a partial download?)")
    items = []
    for i, d in enumerate(folders):
        items += [(p, i) for p in list_images(os.path.join(folder, d))[n_train:]]
    return ImageList(items, transform), None, "all but the first 30 images per class (VTAB's rule, not its draw)"


def clevr_items(root, label_of_scene):
    base = find_dir(root, "CLEVR_v1.0", "clevr/CLEVR_v1.0")
    with open(os.path.join(base, "scenes", "CLEVR_val_scenes.json")) as f:
        scenes = json.load(f)["scenes"]
    return [(os.path.join(base, "images", "val", s["image_filename"]), label_of_scene(s)) for s in scenes]


def clevr_count(scene):
    return len(scene["objects"]) - 3  # VTAB's count_all: 3..10 objects -> 8 classes


def clevr_closest_distance(scene):
    """VTAB's closest_object_distance: depth of the nearest object binned at 8, 8.5, 9, 9.5, 10."""
    depth = min(o["pixel_coords"][2] for o in scene["objects"])
    thresholds = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
    return int(np.max(np.where(thresholds - depth < 0)))


def read_clevr_count_all(root, transform, download):
    return ImageList(clevr_items(root, clevr_count), transform), None, "CLEVR val (VTAB's test split)"


def read_clevr_closest_object_distance(root, transform, download):
    return ImageList(clevr_items(root, clevr_closest_distance), transform), None, "CLEVR val (VTAB's test split)"


def kitti_label(depth):
    """VTAB's closest_vehicle_distance bins: the largest i with thresholds[i] < depth, for thresholds
    (-100, 8, 20, 999); so 8.00 m exactly is still class 0 and 'no vehicle' (depth 1000) is class 3."""
    return max(i for i, t in enumerate((-100.0, 8.0, 20.0, 999.0)) if t < depth)


def read_kitti(root, transform, download):
    """VTAB's KITTI task: depth of the nearest Car/Van/Truck, binned by kitti_label. VTAB tests on TFDS's kitti `test`
    split (711 images, chosen by drive); give its image ids in test_ids.txt to use it, otherwise every labelled
    training image is evaluated."""
    base = find_dir(root, "training", "Kitti/raw/training")
    ids_file = os.path.join(root, "test_ids.txt")
    if os.path.exists(ids_file):
        with open(ids_file) as f:
            ids, note = [line.strip() for line in f if line.strip()], "ids from test_ids.txt"
    else:
        ids = sorted(f[:-4] for f in os.listdir(os.path.join(base, "label_2")) if f.endswith(".txt"))
        note = "all labelled training images (no test_ids.txt: not VTAB's 711-image split)"
    items = []
    for i in ids:
        with open(os.path.join(base, "label_2", i + ".txt")) as f:
            rows = [line.split() for line in f if line.strip()]
        depth = min([float(r[13]) for r in rows if r[0] in ("Car", "Van", "Truck")] + [1000.0])
        items.append((os.path.join(base, "image_2", i + ".png"), kitti_label(depth)))
    return ImageList(items, transform), None, note


def read_resisc45(root, transform, download):
    """NWPU-RESISC45's class folders, labelled by their index in clip_benchmark's class list (TFDS's names, which are
    the folder names); a fixed 20% of the images, VTAB's test size."""
    folder = find_dir(root, "NWPU-RESISC45", "")
    label = {c: i for i, c in enumerate(prompts()["resisc45"]["classes"])}
    unknown = [d for d in class_folders(folder) if d not in label]
    if unknown:
        raise ValueError(f"{folder} has class folders RESISC45 does not have: {', '.join(unknown[:5])}")
    items = fixed_subset(folder_items(folder, label), 0.2)
    return ImageList(items, transform), None, "fixed 20% subset (seed 0), VTAB's test size"


def read_eurosat(root, transform, download):
    import torchvision.datasets as tvd
    full = tvd.EuroSAT(root=root, transform=RGB(transform), download=download)  # no split: VTAB tests on 20%
    ds = Subset(full, [i for i, _ in fixed_subset(list(enumerate(full.targets)), 0.2)])
    return ds, None, "fixed 20% subset (seed 0) of torchvision EuroSAT, VTAB's test size"


def read_voc2007(root, transform, download):
    """Every annotated object of the VOC 2007 test set cropped to its box (clip_benchmark's PASCALVoc2007Cropped)."""
    base = find_dir(root, "VOCdevkit/VOC2007", "VOC2007")
    classes = prompts()["voc2007"]["classes"]
    with open(os.path.join(base, "ImageSets", "Main", "test.txt")) as f:
        ids = [line.strip() for line in f if line.strip()]
    items = []
    for i in ids:
        for obj in ET.parse(os.path.join(base, "Annotations", i + ".xml")).findall("object"):
            box = [int(obj.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
            items.append((os.path.join(base, "JPEGImages", i + ".jpg"), classes.index(obj.find("name").text), box))
    return ImageList(items, transform), None, "test"


# clip_benchmark's webdataset copies (its build_wds_dataset; DataComp's evaluation reads the same files):
#   wds_<name>/test/nshards.txt, wds_<name>/test/0.tar ... (n-1).tar, classnames.txt,
#   zeroshot_classification_templates.txt, dataset_type.txt ("retrieval" for caption sets; absent: classification)
# Each sample is the consecutive tar members sharing a key: an image (.webp, .png, .jpg or .jpeg) and a .cls label, or
# a .txt of captions, one per line. Read here with tarfile, by member offset, so no webdataset import at run time.

WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # build_wds_dataset's to_tuple order: the first one present


def wds_shards(root, split="test"):
    """root/split/0.tar ... (n-1).tar, n from root/split/nshards.txt, in the order build_wds_dataset reads them."""
    with open(os.path.join(root, split, "nshards.txt")) as f:
        n = int(f.read().strip())
    shards = [os.path.join(root, split, f"{i}.tar") for i in range(n)]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {n} shards nshards.txt counts are missing, e.g. {missing[0]}")
    return shards


def wds_samples(shard):
    """[(key, {ext: (offset, size)})] of one plain tar shard, in file order. As webdataset groups them: a key is a
    member's path up to the first dot of its file name, the extension (lower-cased) the rest, and consecutive members
    with one key are one sample. A damaged shard is an error naming it, never a silently shorter test set."""
    samples, size = [], os.path.getsize(shard)
    try:
        with tarfile.open(shard, "r:") as tar:  # uncompressed, as clip_benchmark writes: members are read by offset
            for m in tar:
                folder, name = os.path.split(m.name)
                key, dot, ext = name.partition(".")
                if not m.isfile() or not dot:
                    continue
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError(f"member {m.name} is cut off")
                if not samples or samples[-1][0] != os.path.join(folder, key):
                    samples.append((os.path.join(folder, key), {}))
                samples[-1][1][ext.lower()] = (m.offset_data, m.size)
            if size < tar.offset + 2 * tarfile.BLOCKSIZE:  # cut between two members: tarfile just stops there
                raise tarfile.ReadError("no end-of-archive blocks after its last member (cut short?)")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{shard}: {type(e).__name__}: {e}") from e
    return samples


def read_member(f, offset, size):
    f.seek(offset)
    return f.read(size)


class WdsTestSplit(Dataset):
    """The test split of a webdataset copy, in shard and file order: (image, its `cls` label), or for retrieval
    (image, sample index) with the lines of its `txt` in self.captions. A sample without an image or a label
    raises when read, so it is skipped and counted like an unreadable file (build_wds_dataset would stop)."""

    def __init__(self, root, transform, retrieval=False):
        self.transform, self.items, self.captions = transform, [], []
        for shard in wds_shards(root):
            with open(shard, "rb") as f:  # labels and captions are read now (they are small), images when asked
                for key, fields in wds_samples(shard):
                    self.add(shard, key, fields, f, retrieval)

    def add(self, shard, key, fields, f, retrieval):
        image = next((fields[e] for e in WDS_IMAGE_EXTENSIONS if e in fields), None)
        text = fields.get("txt" if retrieval else "cls")
        text = None if text is None else read_member(f, *text).decode("utf-8")
        if retrieval:  # str.splitlines, as build_wds_dataset's map_tuple(transform, str.splitlines)
            self.captions.append([] if text is None else text.splitlines())
            label = len(self.items) if text is not None else None
        else:
            label = int(text.strip()) if text is not None and text.strip().isdigit() else None
        self.items.append((f"{shard}:{key}", shard, image, label))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        _, shard, image, label = self.items[i]
        if image is None or label is None:
            raise ValueError("sample has no " + ("image (.webp/.png/.jpg/.jpeg)" if image is None else "label"))
        with open(shard, "rb") as f, Image.open(io.BytesIO(read_member(f, *image))) as img:
            return self.transform(img.convert("RGB")), label


def wds_text(root, name):
    """A metadata file of a webdataset copy as build_wds_dataset reads it (lines, stripped), or None if absent."""
    path = os.path.join(root, name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines()]

# -----------------------------------------------------------------------------------------------------------------
# 4. The paper's 29 classification sets (Table 1): one entry each, with how it is read and where its files live

FAMILIES = ["ImageNet", "ImageNet OOD", "VTAB", "Fine-grained & Specialty", "Misc. / Domain & Small"]
IMAGENET, IMAGENET_OOD, VTAB, FINE_GRAINED, MISC = FAMILIES


@dataclass
class Benchmark:
    title: str
    family: str
    task: str
    n_test: int  # as in the paper's Table 1
    n_classes: int
    read: object  # a Torchvision entry or a reader function (section 3)
    layout: str = ""  # the files under <data-root>, for layout_table(); a Torchvision entry describes itself
    folder: str = ""  # under --data-root; defaults to the benchmark's name


BENCHMARKS = {
    "imagenet1k": Benchmark("ImageNet-1k", IMAGENET, "Visual recog.", 50000, 1000, read_imagenet1k,
                            "imagenet1k/val/<wnid>/*.JPEG, or imagenet1k/: torchvision ImageNet(split='val')"),
    "imagenet-a": Benchmark("ImageNet-A", IMAGENET_OOD, "Visual recog.", 7500, 200,
                            functools.partial(read_wnid_folders, name="imagenet-a"),
                            "imagenet-a/<wnid>/*.jpg (the released tar, extracted)"),
    "imagenet-o": Benchmark("ImageNet-O", IMAGENET_OOD, "Visual recog.", 2000, 200,
                            functools.partial(read_wnid_folders, name="imagenet-o"),
                            "imagenet-o/<wnid>/*.jpg (the released tar, extracted)"),
    "imagenet-r": Benchmark("ImageNet-R", IMAGENET_OOD, "Visual recog.", 30000, 200,
                            functools.partial(read_wnid_folders, name="imagenet-r"),
                            "imagenet-r/<wnid>/*.jpg (the released tar, extracted)"),
    "imagenet_sketch": Benchmark("ImageNet-Sketch", IMAGENET_OOD, "Visual recog.", 50889, 1000, read_wnid_folders,
                                 "imagenet_sketch/[sketch/]<wnid>/*.JPEG (the zip, extracted)"),
    "imagenetv2": Benchmark("ImageNet-V2", IMAGENET_OOD, "Visual recog.", 10000, 1000, read_imagenetv2,
                            "imagenetv2/[ImageNetV2-matched-frequency/]<0..999>/*.jpeg"),
    "objectnet": Benchmark("ObjectNet", IMAGENET_OOD, "Visual recog.", 18574, 113, read_objectnet,
                           "objectnet/objectnet-1.0/{images,mappings}/"),
    "cifar100": Benchmark("CIFAR-100", VTAB, "Visual recog.", 10000, 100, Torchvision("CIFAR100", {"train": False})),
    "caltech101": Benchmark("Caltech-101", VTAB, "Object recog.", 6085, 102, read_caltech101,
                            "caltech101/[caltech101/]101_ObjectCategories/<class>/*.jpg"),
    "clevr_closest_object_distance": Benchmark(
        "CLEVR-Dist.", VTAB, "Distance pred.", 15000, 6, read_clevr_closest_object_distance,
        "clevr/[clevr/]CLEVR_v1.0/{images/val/, scenes/CLEVR_val_scenes.json}", "clevr"),
    "clevr_count_all": Benchmark("CLEVR-Count", VTAB, "Counting", 15000, 8, read_clevr_count_all,
                                 "clevr/ (as clevr_closest_object_distance)", "clevr"),
    "kitti_closest_vehicle_distance": Benchmark(
        "KITTI-CVD", VTAB, "Distance pred.", 711, 4, read_kitti,
        "kitti/[Kitti/raw/]training/{image_2,label_2}/ (+ optional kitti/test_ids.txt)", "kitti"),
    "dtd": Benchmark("DTD", VTAB, "Texture cls.", 1880, 47, Torchvision("DTD", {"split": "test"})),  # partition 1
    "eurosat": Benchmark("EuroSAT", VTAB, "Satellite recog.", 5400, 10, read_eurosat,
                         "eurosat/: torchvision EuroSAT() (a fixed 20% of it)"),
    "flowers": Benchmark("Flowers-102", VTAB, "Flower recog.", 6149, 102, Torchvision("Flowers102", {"split": "test"})),
    "pets": Benchmark("Oxford-IIIT Pet", VTAB, "Pet cls.", 3669, 37,
                      Torchvision("OxfordIIITPet", {"split": "test", "target_types": "category"})),
    "resisc45": Benchmark("RESISC45", VTAB, "Remote-sens.", 6300, 45, read_resisc45,
                          "resisc45/[NWPU-RESISC45/]<class>/*.jpg"),
    "svhn": Benchmark("SVHN", VTAB, "Digit recog.", 26032, 10, Torchvision("SVHN", {"split": "test"})),
    "pcam": Benchmark("PCAM", VTAB, "Histopath. cls.", 32768, 2, Torchvision("PCAM", {"split": "test"})),
    "cars": Benchmark("Stanford Cars", FINE_GRAINED, "Vehicle recog.", 8041, 196,
                      Torchvision("StanfordCars", {"split": "test"})),
    "food101": Benchmark("Food-101", FINE_GRAINED, "Food recog.", 25250, 101,
                         Torchvision("Food101", {"split": "test"}, spaces=True)),
    "fgvc_aircraft": Benchmark("FGVC-Aircraft", FINE_GRAINED, "Aircraft recog.", 3333, 100,
                               Torchvision("FGVCAircraft", {"split": "test", "annotation_level": "variant"})),
    "voc2007": Benchmark("PASCAL VOC 07", FINE_GRAINED, "Object recog.", 14976, 20, read_voc2007,
                         "voc2007/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main/test.txt}"),
    "cifar10": Benchmark("CIFAR-10", MISC, "Visual recog.", 10000, 10, Torchvision("CIFAR10", {"train": False})),
    "country211": Benchmark("Country211", MISC, "Geolocation", 21100, 211,
                            Torchvision("Country211", {"split": "test"})),
    "gtsrb": Benchmark("GTSRB", MISC, "Traffic-sign recog.", 12630, 43, Torchvision("GTSRB", {"split": "test"})),
    "mnist": Benchmark("MNIST", MISC, "Digit recog.", 10000, 10, Torchvision("MNIST", {"train": False})),
    "renderedsst2": Benchmark("Rendered-SST2", MISC, "Sentiment cls.", 1821, 2,
                              Torchvision("RenderedSST2", {"split": "test"})),
    "stl10": Benchmark("STL-10", MISC, "Visual recog.", 8000, 10, Torchvision("STL10", {"split": "test"})),
}
RETRIEVAL = {"flickr30k": ("Flickr 1K Test", "dataset_flickr30k.json"),  # name: (Table 2 heading, Karpathy JSON)
             "coco": ("MS-COCO 2014 5K Test", "dataset_coco.json")}
RETRIEVAL_LAYOUT = {"flickr30k": "flickr30k/dataset_flickr30k.json + images in flickr30k/[flickr30k-images/|images/]",
                    "coco": "coco/dataset_coco.json + coco/val2014/*.jpg (Karpathy JSON, `filepath` field)"}
PROBES = ("tid2013", "cue_conflict", "noise")
PROBE_LAYOUT = {"tid2013": "tid2013/{mos_with_names.txt, reference_images/, distorted_images/}",
                "cue_conflict": "cue-conflict/<shape>/<shape>N-<texture>M.png (Geirhos et al.)",
                "noise": "CIFAR-100-C/{gaussian_noise.npy, labels.npy} (+ cifar100/ for the clean accuracy)"}
# The names of the sets' webdataset copies where they are not the set's own: clip_benchmark's (benchmark/
# webdatasets.txt, wds/<name> in a folder wds_<name> with "/" as "-": its VTAB sets are vtab/<name>) and DataComp's
# (tasklist.yml; download_evalsets.py names the same copies wds_<name>_test). Both spellings are looked for.
WDS_NAMES = {**{n: ("vtab-" + n,) for n, b in BENCHMARKS.items() if b.family == VTAB},
             "cifar10": ("cifar10", "vtab-cifar10"), "coco": ("mscoco_captions",)}


def wds_folders(name):
    """The folder names set `name`'s webdataset copy may have under --data-root, in the order they are looked for."""
    return [f"wds_{n}{suffix}" for n in WDS_NAMES.get(name, (name,)) for suffix in ("", "_test")]


def is_wds(root):
    return os.path.basename(os.path.normpath(root)).startswith("wds_")


def dataset_root(data_root, name):
    """Where set `name` (a classification or retrieval benchmark) is read from: its webdataset copy under data_root
    when there is one (the copies carry VTAB's own test splits), else its raw folder."""
    for folder in wds_folders(name):
        if os.path.isdir(os.path.join(data_root, folder)):
            return os.path.join(data_root, folder)
    return os.path.join(data_root, BENCHMARKS[name].folder or name if name in BENCHMARKS else name)


def layout_of(name):
    b = BENCHMARKS[name]
    return b.read.layout(b.folder or name) if isinstance(b.read, Torchvision) else b.layout


def layout_table(markdown=False):
    """Where every set's files live under --data-root, from BENCHMARKS itself. The module docstring and README.md
    carry a copy of this text, and a test checks that they still do, so the three cannot drift apart."""
    rows = [(n, layout_of(n)) for n in BENCHMARKS] + list(RETRIEVAL_LAYOUT.items()) + list(PROBE_LAYOUT.items())
    if markdown:
        return "\n".join(["| benchmark | files under `--data-root` | or its webdataset copy (read first) |",
                          "|---|---|---|"]
                         + [f"| {n} | `{where}` | {wds_cell(n)} |" for n, where in rows])
    names = ", ".join(n for b in [*BENCHMARKS, *RETRIEVAL] for n in WDS_NAMES.get(b, (b,)))
    wds = textwrap.wrap("The webdataset copies, read instead of the files above wherever they are present: "
                        "<data-root>/wds_<name>/ (clip_benchmark) or wds_<name>_test/ (DataComp), <name> one of "
                        f"{names}.", 112, break_on_hyphens=False)
    return "\n".join([f"    {n:30s} {where}" for n, where in rows] + [""] + [f"    {line}" for line in wds])


def wds_cell(name):
    if name not in BENCHMARKS and name not in RETRIEVAL:
        return "—"
    return " or ".join(f"`{f}/`" for f in wds_folders(name))


_PROMPTS = None


def prompts():
    """zeroshot_prompts.json: CLIP's class names and templates, as clip_benchmark ships them (see its _source)."""
    global _PROMPTS
    if _PROMPTS is None:
        with open(os.path.join(HERE, "zeroshot_prompts.json"), encoding="utf-8") as f:
            _PROMPTS = json.load(f)
    return _PROMPTS


def parse_names(text, known, what):
    """'all' or a comma list, checked at once so a typo fails before any model is loaded."""
    if not text:
        return []
    names = list(known) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}. Known: {', '.join(known)}")
    return names


def build_dataset(name, root, transform, download=False):
    """Test split of benchmark `name` read from `root`, its raw folder or its webdataset copy (a folder named
    wds_...) -> (dataset of (image, label), class names, info). The class names are ours: zeroshot_prompts.json's
    where it lists them, else the reader's (torchvision's list, ObjectNet's mappings). info: {"split": which test
    split was read, ...}. Raises OSError / ValueError / KeyError when files are missing or malformed."""
    if is_wds(root):
        return read_wds_classification(name, root, transform)
    ds, classes, note = BENCHMARKS[name].read(root, transform, download)
    listed = prompts()[name]["classes"]
    return ds, listed if listed is not None else classes, {"split": note, "layout": "raw"}


def our_classnames(name):
    """Set `name`'s class names where they need no files: zeroshot_prompts.json's list, or ImageNet's names of the
    set's wnids; None where the raw files carry them (torchvision's class lists, ObjectNet's mappings)."""
    listed = prompts()[name]["classes"]
    if listed is None and BENCHMARKS[name].family in (IMAGENET, IMAGENET_OOD) and name != "objectnet":
        names = imagenet_names()
        return [names[w] for w in set_wnids(name)]
    return listed


def wds_classnames(name, theirs):
    """(class names in the copy's label order, a note for the results) from a copy's classnames.txt. Ours are kept;
    where they are a reordering of the copy's (Caltech-101: TFDS orders its classes differently from the folders),
    the copy's order is the label order; where names differ, ours are used place by place and the places reported."""
    n = BENCHMARKS[name].n_classes
    if len(theirs) != n:
        raise ValueError(f"classnames.txt has {len(theirs)} names, {BENCHMARKS[name].title} has {n} classes")
    ours = our_classnames(name)
    if ours is None:  # ours come from the raw files; clip_benchmark wrote the copy's from the same lists
        spaces = getattr(BENCHMARKS[name].read, "spaces", False)
        return [c.replace("_", " ") for c in theirs] if spaces else theirs, \
            {"classnames": "the copy's classnames.txt (ours are read from the raw files' own class list)"}
    if theirs == ours:
        return ours, {"classnames": "ours (the copy's classnames.txt is the same)"}
    if sorted(theirs) == sorted(ours):
        return theirs, {"classnames": "ours, in the copy's label order (its classnames.txt orders them differently)",
                        "classnames_reordered": True}
    differ = [[i, t, o] for i, (t, o) in enumerate(zip(theirs, ours)) if t != o]
    if 2 * len(differ) > n:  # not a spelling here and there: which label is which class cannot be told
        raise ValueError(f"classnames.txt differs from our class names at {len(differ)} of {n} places, "
                         f"e.g. label {differ[0][0]}: {differ[0][1]!r} vs {differ[0][2]!r}")
    return ours, {"classnames": f"ours; the copy's classnames.txt differs at {len(differ)} of {n} places",
                  "classnames_differ": [{"label": i, "copy": t, "ours": o} for i, t, o in differ[:10]]}


def read_wds_classification(name, root, transform):
    """A classification set's webdataset copy -> (dataset, class names, info), as build_dataset returns them."""
    kind = " ".join(wds_text(root, "dataset_type.txt") or []).strip().lower() or "classification"
    if kind != "classification":
        raise ValueError(f"{root}/dataset_type.txt says {kind!r}, not a single-label classification copy")
    theirs = wds_text(root, "classnames.txt")
    if theirs is None:
        raise FileNotFoundError(f"{root}/classnames.txt")
    classes, note = wds_classnames(name, theirs)
    split = ("VTAB's test split (from TFDS, as the webdataset copy holds it)" if "wds_vtab-" in os.path.basename(
        os.path.normpath(root)) else "test (as the webdataset copy holds it)")
    return WdsTestSplit(root, transform), classes, {"split": split, "layout": "webdataset", **note}

# -----------------------------------------------------------------------------------------------------------------
# 5. Zero-shot classification and retrieval


@contextlib.contextmanager
def eval_mode(model):
    """Evaluate in eval mode and put the model back as it was (train_clip.py calls these mid-training)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _device_of(model):
    return next(model.parameters()).device


def zero_shot_eval(model, tokenizer, name, root, transform=None, batch_size=256, workers=4, cache_dir=None,
                   cache_tag=None, download=False):
    """Zero-shot top-1 / top-5 / mean per-class recall (percent) of `model` on benchmark `name` read from `root`
    (= <data-root>/<folder>, or the set's webdataset copy <data-root>/wds_<name>; dataset_root picks). top5 is None
    where #classes <= 5 (it would be 100 by construction). The result says which split and files were read.
    Importable from train_clip.py. DatasetUnavailable when the set's files are missing or none of its images can be
    read."""
    transform = transform or data.eval_transform(model.config.image_size)
    try:
        ds, classnames, info = build_dataset(name, root, transform, download)
    except (OSError, RuntimeError, ImportError, KeyError, ValueError) as e:  # files missing / incomplete
        raise DatasetUnavailable(f"{type(e).__name__}: {e}") from e
    if len(ds) == 0:
        raise DatasetUnavailable(f"no images found under {root}")
    r = zero_shot_on(model, tokenizer, ds, classnames, prompts()[name]["templates"], batch_size=batch_size,
                     workers=workers, cache_dir=cache_dir, cache_tag=cache_tag, desc=name)
    return {**r, **info, "path": root}


def zero_shot_logits(model, tokenizer, ds, classnames, templates, batch_size=256, workers=4, cache_dir=None,
                     cache_tag=None, desc="zero-shot"):
    """(logits [N, C] = 100 * image_emb @ classifier, labels [N], unreadable items) over the N readable images of a
    dataset of (image, class index); C = len(classnames)."""
    device = _device_of(model)
    with eval_mode(model):
        clf = cached_classifier(model, tokenizer, classnames, templates, device, cache_dir, cache_tag)
        feats, labels, unreadable = encode_images(model, make_loader(ds, batch_size, workers, device), device, desc)
    if labels.max() >= len(classnames) or labels.min() < 0:
        raise ValueError(f"labels run from {labels.min()} to {labels.max()} but there are {len(classnames)} classes")
    return 100 * feats @ clf, labels, unreadable


def zero_shot_on(model, tokenizer, ds, classnames, templates, batch_size=256, workers=4, cache_dir=None, cache_tag=None,
                 desc="zero-shot"):
    """Top-1 / top-5 / mean per-class recall (percent) on a dataset of (image, class index), over its readable
    images (n; the others are counted in n_unreadable); top5 None where #classes <= 5. Every class is a candidate
    whether or not it has images: a set whose images cover fewer classes than its list (a partial download) is still
    the whole task, and says so in `incomplete`."""
    logits, labels, unreadable = zero_shot_logits(model, tokenizer, ds, classnames, templates, batch_size, workers,
                                                  cache_dir, cache_tag, desc)
    n_classes, present = len(classnames), len(torch.unique(labels))
    top5 = 100 * topk_accuracy(logits, labels, 5) if n_classes > 5 else None
    out = {"top1": 100 * topk_accuracy(logits, labels, 1), "top5": top5,
           "mean_per_class_recall": 100 * mean_per_class_recall(logits, labels), "n": len(labels),
           "n_classes": n_classes, "n_classes_with_images": present, **unreadable_record(unreadable)}
    if present < n_classes:
        out["incomplete"] = (f"only {present} of the {n_classes} classes have images (a partial download?); scored "
                             f"over all {n_classes}, as the full set is")
    return out


def folder_zero_shot_eval(model, tokenizer, folder, classnames, templates, transform=None, batch_size=256, workers=4):
    """Zero-shot on an ImageFolder tree <folder>/<class>/*.png whose sorted folders are named by `classnames`
    (the synthetic world's tasks; also handy for any custom set)."""
    transform = transform or data.eval_transform(model.config.image_size)
    dirs = class_folders(folder)
    if len(dirs) != len(classnames):
        raise ValueError(f"{folder} has {len(dirs)} class folders but {len(classnames)} class names were given")
    ds = ImageList(folder_items(folder, {d: i for i, d in enumerate(dirs)}), transform)
    return zero_shot_on(model, tokenizer, ds, classnames, templates, batch_size=batch_size, workers=workers,
                        desc=os.path.basename(folder))


# Captions per image scored in retrieval: 5, the protocol of the Karpathy test splits (Karpathy & Fei-Fei 2015: 5,000
# captions for Flickr30k's 1k images, 25,000 for COCO's 5k) on which the CLIP paper (Radford et al. 2021) and the PI
# paper (Table 2) report retrieval. COCO's Karpathy JSON has 6-7 captions for some test images (25,010 in all);
# clip_benchmark scores all of them (--captions-per-image 0 here), which moves R@K.
CAPTIONS_PER_IMAGE = 5


class KarpathyRetrieval(Dataset):
    """Karpathy's split JSON ({"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}): the `test`
    images with all their captions, in the JSON's order (retrieval_on keeps the first --captions-per-image). Items
    are (image, image index)."""

    def __init__(self, json_path, image_root, transform, split="test"):
        with open(json_path, encoding="utf-8") as f:
            index = json.load(f)
        if not isinstance(index, dict) or not isinstance(index.get("images"), list):
            raise ValueError(f"{json_path} has no \"images\" list: not a Karpathy split JSON")
        images = [im for im in index["images"] if im.get("split") == split]
        rel = [os.path.join(im.get("filepath", ""), im["filename"]) for im in images]
        if not rel:
            raise ValueError(f"{json_path} has no images in split '{split}'")
        roots = [image_root] + [os.path.join(image_root, d) for d in ("flickr30k-images", "images")]
        found = [r for r in roots if any(os.path.exists(os.path.join(r, p)) for p in rel[:20])]
        if not found:
            raise FileNotFoundError(f"{rel[0]} under any of " + ", ".join(roots))
        self.paths = [os.path.join(found[0], r) for r in rel]
        self.captions = [[s["raw"].strip() for s in im["sentences"]] for im in images]
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), i


def retrieval_on(model, tokenizer, ds, captions_per_image=CAPTIONS_PER_IMAGE, batch_size=256, workers=4,
                 desc="retrieval"):
    """Table 2: I->T and T->I R@1/5/10 (percent) on a dataset of (image, index) with its captions in ds.captions,
    the first `captions_per_image` of each image (0: all). An unreadable image is left out with its captions and
    counted; n_texts is the number of captions scored, n_texts_in_files how many the readable images have."""
    device = _device_of(model)
    with eval_mode(model):
        image_emb, image_ids, unreadable = encode_images(model, make_loader(ds, batch_size, workers, device), device,
                                                         desc=desc)
        in_files = [ds.captions[i] for i in image_ids.tolist()]  # of the readable images, in their order
        captions = [caps[:captions_per_image] if captions_per_image else caps for caps in in_files]
        texts = [c for caps in captions for c in caps]
        text_emb = encode_texts(model, tokenizer, texts, device)
    text_to_image = [i for i, caps in enumerate(captions) for _ in caps]
    return {**retrieval_metrics(image_emb, text_emb, text_to_image), "n_images": len(captions), "n_texts": len(texts),
            "captions_per_image": captions_per_image or "all", "n_texts_in_files": sum(map(len, in_files)),
            **unreadable_record(unreadable)}


def retrieval_eval(model, tokenizer, path, image_root=None, transform=None, batch_size=256, workers=4,
                   captions_per_image=CAPTIONS_PER_IMAGE):
    """Retrieval (retrieval_on) on the test split of a Karpathy-format JSON (Flickr30k 1k test, COCO 5k test), its
    images looked up under image_root (default: the JSON's folder), or on a webdataset copy (a wds_... folder:
    wds_flickr30k, wds_mscoco_captions)."""
    transform = transform or data.eval_transform(model.config.image_size)
    if is_wds(path):
        kind = " ".join(wds_text(path, "dataset_type.txt") or []).strip().lower()
        if kind != "retrieval":
            raise ValueError(f"{path}/dataset_type.txt says {kind or 'nothing'!r}, not 'retrieval'")
        ds, split = WdsTestSplit(path, transform, retrieval=True), "test (as the webdataset copy holds it)"
    else:
        ds, split = KarpathyRetrieval(path, image_root or os.path.dirname(path), transform), "Karpathy test split"
    r = retrieval_on(model, tokenizer, ds, captions_per_image, batch_size, workers, desc=os.path.basename(path))
    return {**r, "split": split, "path": path}

# -----------------------------------------------------------------------------------------------------------------
# 6. NIGHTS 2AFC (stage 1's dataset and metric) and perceptual probes (TID2013, cue conflict, noise)

NIGHTS_EVAL_SPLITS = ("val", "test_imagenet", "test_no_imagenet")


def nights_eval(model, root, batch_size=128, workers=4):
    """2AFC accuracy (percent) on NIGHTS val, test_imagenet, test_no_imagenet, and their size-weighted test mean
    (DreamSim's overall score), through model.triplet_distances as stage 1's validation. A triplet with an
    unreadable image is left out and counted."""
    device = _device_of(model)
    out = {}
    with eval_mode(model):
        for split in NIGHTS_EVAL_SPLITS:
            try:
                ds = data.NightsTriplets(root, split, image_size=model.config.image_size)  # no augmentation
            except (FileNotFoundError, RuntimeError, ValueError) as e:
                out[split] = skipped(str(e), root)
                continue
            unreadable = []
            batches = readable_batches(make_loader(ds, batch_size, workers, device), unreadable, f"nights {split}")
            d0, d1, label = triplet_distances(model, batches, device)
            if len(label) == 0:
                out[split] = skipped(f"none of the {len(ds)} triplets could be read, e.g. {unreadable[:1]}", root)
                continue
            no_votes = getattr(ds, "dropped", {}).get("no_votes", 0)  # rows with an empty votes cell
            out[split] = {"2afc": 100 * two_afc_scores(d0, d1, label).mean().item(), "n": len(label),
                          **unreadable_record(unreadable), **({"n_no_votes": no_votes} if no_votes else {})}
    tests = [out[s] for s in ("test_imagenet", "test_no_imagenet") if "2afc" in out.get(s, {})]
    if len(tests) == 2:
        n = sum(t["n"] for t in tests)
        out["test"] = {"2afc": sum(t["2afc"] * t["n"] for t in tests) / n, "n": n}
    return out


def tid2013_eval(model, root, transform=None, batch_size=256, workers=4):
    """Hernández-Cámara et al.: cosine similarity of reference vs distorted embeddings, correlated with TID2013's
    MOS (Pearson and Spearman; higher MOS = closer to the reference, so a good model gives positive values)."""
    device = _device_of(model)
    transform = transform or data.eval_transform(model.config.image_size)
    files = {}  # TID2013 mixes upper- and lower-case names (I01.BMP, i01_01_1.bmp): look them up case-blind
    for sub in ("reference_images", "distorted_images"):
        for f in os.listdir(os.path.join(root, sub)):
            files[(sub, f.lower())] = os.path.join(root, sub, f)
    mos, pairs = [], []
    with open(os.path.join(root, "mos_with_names.txt")) as f:
        for line in f:
            if line.strip():
                score, name = line.split()
                ref = files[("reference_images", name.lower().split("_")[0] + ".bmp")]
                pairs.append((ref, files[("distorted_images", name.lower())]))
                mos.append(float(score))
    paths = sorted({p for pair in pairs for p in pair})
    with eval_mode(model):
        loader = make_loader(ImageList([(p, i) for i, p in enumerate(paths)], transform), batch_size, workers, device)
        emb, ids, unreadable = encode_images(model, loader, device, desc="tid2013")
    row = {paths[i]: k for k, i in enumerate(ids.tolist())}  # a pair with an unreadable image is left out
    kept = [(r, d, m) for (r, d), m in zip(pairs, mos) if r in row and d in row]
    sim = np.array([float(emb[row[r]] @ emb[row[d]]) for r, d, _ in kept])
    mos = [m for _, _, m in kept]
    return {"pearson": pearson(sim, mos), "spearman": spearman(sim, mos), "n": len(kept),
            **unreadable_record(unreadable)}


def cue_conflict_eval(model, tokenizer, root, transform=None, batch_size=256, workers=4):
    """Texture-shape bias on Geirhos et al.'s cue-conflict images (<shape>/<shape>N-<texture>M.png; images whose
    shape and texture class agree are left out). texture_bias: the share of images where the texture class's prompt
    beats the shape class's (a pairwise form of Geirhos et al.'s measure). shape_bias (Geirhos' protocol): among
    images whose 16-way zero-shot decision is the shape or the texture class, the share decided by shape."""
    device = _device_of(model)
    transform = transform or data.eval_transform(model.config.image_size)
    classes = class_folders(root)
    items, textures = [], []
    for i, c in enumerate(classes):
        for p in list_images(os.path.join(root, c)):
            texture = re.sub(r"\d+$", "", os.path.splitext(os.path.basename(p))[0].split("-")[-1])
            if texture != c and texture in classes:
                items.append((p, i))
                textures.append(classes.index(texture))
    if not items:
        return skipped("no <shape>/<shape>N-<texture>M.png images found", root)
    shapes = torch.tensor([label for _, label in items])
    with eval_mode(model):
        clf = zero_shot_classifier(model, tokenizer, classes, prompts()["imagenet1k"]["templates"], device)
        loader = make_loader(ImageList([(p, i) for i, (p, _) in enumerate(items)], transform), batch_size, workers,
                             device)
        emb, ids, unreadable = encode_images(model, loader, device, desc="cue-conflict")
    logits, shape, texture = emb @ clf, shapes[ids], torch.tensor(textures)[ids]
    rows = torch.arange(len(ids))
    tex_wins = (logits[rows, texture] > logits[rows, shape]).sum().item()
    shape_wins = (logits[rows, shape] > logits[rows, texture]).sum().item()
    pred = logits.argmax(1)
    by_shape, by_texture = (pred == shape).sum().item(), (pred == texture).sum().item()
    return {"texture_bias": tex_wins / max(tex_wins + shape_wins, 1),
            "shape_bias": by_shape / max(by_shape + by_texture, 1), "n": len(ids), **unreadable_record(unreadable)}


def noise_sensitivity_eval(model, tokenizer, root_c, root_clean, transform=None, batch_size=256, workers=4,
                           clean_top1=None):
    """Relative drop of zero-shot CIFAR-100 top-1 from the clean test set to CIFAR-100-C Gaussian noise (each of
    the 5 severities is a 10,000-image block of gaussian_noise.npy): (clean - noisy) / clean."""
    if clean_top1 is None:
        clean_top1 = zero_shot_eval(model, tokenizer, "cifar100", root_clean, transform, batch_size, workers)["top1"]
    device = _device_of(model)
    transform = transform or data.eval_transform(model.config.image_size)
    images = np.load(os.path.join(root_c, "gaussian_noise.npy"), mmap_mode="r")
    labels = np.load(os.path.join(root_c, "labels.npy"))
    classes = cifar100_classes(root_clean)  # torchvision's list, as zero_shot_eval uses
    with eval_mode(model):
        clf = zero_shot_classifier(model, tokenizer, classes, prompts()["cifar100"]["templates"], device)
        loader = make_loader(ArrayImages(images, labels, transform), batch_size, workers, device)
        feats, y, unreadable = encode_images(model, loader, device, desc="cifar100-c")
    if unreadable:  # in-memory arrays: nothing to skip, and the 5 severity blocks must stay aligned
        raise ValueError(f"{root_c}: {unreadable[0]}")
    per_block = len(images) // 5
    noisy = [100 * topk_accuracy(feats[s:s + per_block] @ clf, y[s:s + per_block], 1)
             for s in range(0, 5 * per_block, per_block)]
    drops = [(clean_top1 - a) / clean_top1 if clean_top1 > 0 else float("nan") for a in noisy]
    return {"clean_top1": clean_top1, "noisy_top1": noisy, "relative_drop": drops,
            "mean_relative_drop": float(np.mean(drops))}


def cifar100_classes(root):
    import torchvision.datasets as tvd
    return tvd.CIFAR100(root, train=False).classes


def synthetic_eval(model, tokenizer, root, batch_size=256, workers=4):
    """The CPU demo's stand-in for Tables 1-2: zero-shot on the synthetic world's tasks, as its
    zeroshot/tasks.json describes them ({task: {folder, classnames, templates}}, classnames in ImageFolder's
    sorted order), and retrieval on its Karpathy-format JSON. Reads files only, like every other benchmark."""
    out = {"zeroshot": {}, "retrieval": None}
    tasks_json = os.path.join(root, "zeroshot", "tasks.json")
    if not os.path.exists(tasks_json):
        out["zeroshot"]["tasks"] = skipped("missing", tasks_json)
        tasks = {}
    else:
        with open(tasks_json) as f:
            tasks = json.load(f)
    for task, spec in tasks.items():
        if not isinstance(spec, dict) or not {"folder", "classnames", "templates"} <= set(spec):
            raise ValueError(f"{tasks_json}: task '{task}' needs 'folder', 'classnames' and 'templates'")
        folder = os.path.join(root, "zeroshot", spec["folder"])
        out["zeroshot"][task] = (folder_zero_shot_eval(model, tokenizer, folder, spec["classnames"], spec["templates"],
                                                       batch_size=batch_size, workers=workers)
                                 if os.path.isdir(folder) else skipped("missing", folder))
    json_path = os.path.join(root, "retrieval", "dataset_synthetic.json")
    out["retrieval"] = (retrieval_eval(model, tokenizer, json_path, batch_size=batch_size, workers=workers)
                        if os.path.exists(json_path) else skipped("missing", json_path))
    return out

# -----------------------------------------------------------------------------------------------------------------
# 7. One model, every benchmark: a dict with every number; a set that is missing or fails is recorded as skipped


def skipped(reason, path):
    return {"skipped": reason, "path": path}


def failure(error, path):
    """What a benchmark that raised records: the reason (missing files, or any other error by its type) and where."""
    reason = str(error) if isinstance(error, DatasetUnavailable) else f"failed: {type(error).__name__}: {error}"
    return skipped(reason, path)


def zero_shot_benchmark(model, tokenizer, name, data_root, download, kw):
    root = dataset_root(data_root, name)  # the webdataset copy if there is one, else the raw folder
    if not os.path.isdir(root) and not download:
        return skipped("missing", root)
    try:
        return zero_shot_eval(model, tokenizer, name, root, download=download, **kw)
    except Exception as e:  # one bad set must not end the run (nor lose the others' numbers)
        return failure(e, root)


def retrieval_benchmark(model, tokenizer, name, data_root, kw, captions_per_image=CAPTIONS_PER_IMAGE):
    root = dataset_root(data_root, name)
    path = root if is_wds(root) else os.path.join(root, RETRIEVAL[name][1])
    if not os.path.exists(path):
        return skipped(f"missing {path}", root)
    try:
        return retrieval_eval(model, tokenizer, path, root, batch_size=kw["batch_size"], workers=kw["workers"],
                              captions_per_image=captions_per_image)
    except Exception as e:
        return failure(e, path)


def guarded(path, fn, *args, **kwargs):
    """fn(*args, **kwargs), or the failure record for `path` if it raises."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        return failure(e, path)


def log_line(name, r):
    if "skipped" in r:
        return f"{name:32s} skipped ({r['skipped']}: {r['path']})"
    if "top1" in r:
        line = f"{name:32s} top1 {r['top1']:5.1f}  top5 {fmt(r['top5']):>5s}  ({r['n']} images)"
    else:
        line = f"{name:32s} " + "  ".join(f"{k} {r[k]:5.1f}" for k in RETRIEVAL_METRICS) + f" ({r['n_texts']} captions)"
    line += f", {r['n_unreadable']} unreadable skipped" if r.get("n_unreadable") else ""
    return line + (f"; INCOMPLETE: {r['incomplete']}" if r.get("incomplete") else "")


def evaluate(model, tokenizer, data_root, datasets=(), retrieval=(), nights=None, probes=(), synthetic=None,
             batch_size=256, workers=4, cache_dir=None, cache_tag=None, download=False, log=print, on_result=None,
             captions_per_image=CAPTIONS_PER_IMAGE):
    """Everything the report needs for one model. Numbers are percentages (probe correlations and biases are
    fractions). A benchmark whose files are missing, or that fails in any way, is recorded as {"skipped": why,
    "path": where} and the run goes on. on_result(res) is called after every benchmark with the results so far
    (main() rewrites results.json with them). synthetic: root of a world that synthetic_world.make_synthetic_world
    wrote (the CPU demo). Each set is read from its webdataset copy under data_root where there is one."""
    res = {"units": "percent", "zeroshot": {}, "families": {}, "retrieval": {}, "nights": None, "probes": {},
           "synthetic": None}
    done = on_result or (lambda _: None)
    kw = dict(batch_size=batch_size, workers=workers)
    for name in datasets:
        r = zero_shot_benchmark(model, tokenizer, name, data_root, download,
                                dict(kw, cache_dir=cache_dir, cache_tag=cache_tag))
        res["zeroshot"][name] = r
        res["families"] = {fam: {m: family_means(res["zeroshot"], m)[fam] for m in ("top1", "top5")}
                           for fam in FAMILIES}
        log(log_line(name, r))
        done(res)
    for name in retrieval:
        res["retrieval"][name] = r = retrieval_benchmark(model, tokenizer, name, data_root, kw, captions_per_image)
        log(log_line(name, r))
        done(res)
    if nights:
        res["nights"] = (guarded(nights, nights_eval, model, nights, **kw) if os.path.isdir(nights)
                         else skipped("missing", nights))
        log(f"{'nights':32s} {json.dumps(res['nights'])}")
        done(res)
    if synthetic:
        res["synthetic"] = synthetic_eval(model, tokenizer, synthetic, **kw)
        log(f"{'synthetic':32s} {json.dumps(res['synthetic'])}")
        done(res)
    for probe in probes:
        res["probes"][probe] = guarded(data_root, run_probe, probe, model, tokenizer, data_root, res, kw)
        log(f"{probe:32s} {json.dumps(res['probes'][probe])}")
        done(res)
    return res


def run_probe(probe, model, tokenizer, data_root, res, kw):
    """The perceptual probes: TID2013 (Ponomarenko et al. 2015), cue-conflict shape/texture bias (Geirhos et al.
    2019), CIFAR-100-C noise (Hendrycks & Dietterich 2019); each needs its files under --data-root (layout_table)."""
    tid, c = os.path.join(data_root, "tid2013"), os.path.join(data_root, "CIFAR-100-C")
    need = {"tid2013": [os.path.join(tid, f) for f in ("mos_with_names.txt", "reference_images", "distorted_images")],
            "cue_conflict": [os.path.join(data_root, "cue-conflict")],
            "noise": [os.path.join(c, "gaussian_noise.npy"), os.path.join(c, "labels.npy"),
                      os.path.join(data_root, "cifar100")]}
    missing = [p for p in need[probe] if not os.path.exists(p)]
    if missing:
        return skipped("missing", ", ".join(missing))
    if probe == "tid2013":
        return tid2013_eval(model, os.path.join(data_root, "tid2013"), **kw)
    if probe == "cue_conflict":
        return cue_conflict_eval(model, tokenizer, os.path.join(data_root, "cue-conflict"), **kw)
    clean = res["zeroshot"].get("cifar100", {}).get("top1")  # reuse the Table 1 number when it was just measured
    return noise_sensitivity_eval(model, tokenizer, os.path.join(data_root, "CIFAR-100-C"),
                                  os.path.join(data_root, "cifar100"), clean_top1=clean, **kw)

# -----------------------------------------------------------------------------------------------------------------
# 8. Reports: Table 1, Table 2, Figure 2's family means, "better on 23 of 29"

RETRIEVAL_METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def family_means(zeroshot, metric, names=None):
    """Mean of `metric` over each family's evaluated datasets (Figure 2); None for a family with none."""
    out = {}
    for fam in FAMILIES:
        vals = [r[metric] for n, r in zeroshot.items() if BENCHMARKS[n].family == fam and r.get(metric) is not None
                and (names is None or n in names)]
        out[fam] = sum(vals) / len(vals) if vals else None
    return out


def ours_vs_base(ours, base, keys):
    """{key: {ours, base, delta}} for the keys both results have a number for."""
    return {k: {"ours": ours[k], "base": base[k], "delta": ours[k] - base[k]} for k in keys
            if ours.get(k) is not None and base.get(k) is not None}


def nights_splits(res):
    """{split: result} of a results dict's NIGHTS entry: {} when NIGHTS was not run or was skipped as a whole."""
    nights = res.get("nights") or {}
    return {} if "skipped" in nights else {s: r for s, r in nights.items() if isinstance(r, dict)}


ZERO_SHOT_METRICS = ("top1", "top5", "mean_per_class_recall")


def compare(ours, base):
    """Ours vs base on the datasets both evaluated: per-dataset Δ (pp), family means of ours / base / Δ (Figure 2),
    and the paper's win/tie/loss count on top-1, where a tie is a Δ that rounds to 0.0 at the paper's one decimal."""
    ours_zs, base_zs = ours["zeroshot"], base["zeroshot"]
    both = [n for n in BENCHMARKS if "top1" in ours_zs.get(n, {}) and "top1" in base_zs.get(n, {})]
    datasets = {n: ours_vs_base(ours_zs[n], base_zs[n], ZERO_SHOT_METRICS) for n in both}
    count = {"win": 0, "tie": 0, "loss": 0}
    for n in both:
        d = round(datasets[n]["top1"]["delta"], 1)
        count["win" if d > 0 else "loss" if d < 0 else "tie"] += 1
    families = {}
    for fam in FAMILIES:
        for m in ("top1", "top5"):
            rows = [datasets[n][m] for n in both if BENCHMARKS[n].family == fam and m in datasets[n]]
            if rows:
                families.setdefault(fam, {})[m] = {k: sum(r[k] for r in rows) / len(rows)
                                                   for k in ("ours", "base", "delta")}
    retrieval = {n: ours_vs_base(ours["retrieval"][n], base["retrieval"][n], RETRIEVAL_METRICS)
                 for n in RETRIEVAL if n in ours["retrieval"] and n in base["retrieval"]}
    synthetic = None
    ours_syn, base_syn = ours.get("synthetic"), base.get("synthetic")
    if ours_syn and base_syn:
        synthetic = {"zeroshot": {t: ours_vs_base(r, base_syn["zeroshot"].get(t, {}), ("top1", "top5"))
                                  for t, r in ours_syn["zeroshot"].items()},
                     "retrieval": ours_vs_base(ours_syn["retrieval"], base_syn["retrieval"], RETRIEVAL_METRICS)}
    ours_nights, base_nights = nights_splits(ours), nights_splits(base)
    nights = {s: ours_vs_base(r, base_nights[s], ("2afc",))["2afc"] for s, r in ours_nights.items()
              if "2afc" in r and "2afc" in base_nights.get(s, {})} or None
    summary = (f"better on {count['win']} of {len(both)} classification benchmarks (top-1; "
               f"{count['tie']} ties, {count['loss']} losses)")
    return {"datasets": datasets, "families": families, "top1_count": count, "retrieval": retrieval,
            "synthetic": synthetic, "nights": nights, "summary": summary}


def fmt(v, signed=False):
    """A percentage as the paper prints it (one decimal, a sign on differences); — for a missing number."""
    return "—" if v is None else (f"{v:+.1f}" if signed else f"{v:.1f}")


def label_of(res, default):
    """How the report names a model: the label main() gave it from its checkpoint's path, else `default`."""
    return (res or {}).get("label") or default


def labels(ours, base):
    return label_of(ours, "Ours"), label_of(base, "Base")


def table1(ours, base=None):
    """Markdown laid out like the paper's Table 1 (with a column per model and Δ when a base model is given).
    #Cls says how many classes had images where that is fewer than the set has."""
    lo, lb = labels(ours, base)
    if base is None:
        head = "| Dataset | Task | #Test | #Cls | Top-1 | Top-5 |\n|---|---|---:|---:|---:|---:|"
    else:
        head = (f"| Dataset | Task | #Test | #Cls | {lo}@1 | {lb}@1 | Δ@1 | {lo}@5 | {lb}@5 | Δ@5 |\n"
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines, ncol = [head], 6 if base is None else 10
    for fam in FAMILIES:
        names = [n for n, b in BENCHMARKS.items() if b.family == fam and n in ours["zeroshot"]]
        if not names:
            continue
        lines.append(f"| **{fam}** |" + " |" * (ncol - 1))
        for n in names:
            b, o = BENCHMARKS[n], ours["zeroshot"][n]
            ba = (base or {}).get("zeroshot", {}).get(n, {})
            n_test = o.get("n", ba.get("n"))
            n_cls = str(o.get("n_classes", b.n_classes))
            if o.get("incomplete"):
                n_cls += f" ({o['n_classes_with_images']} with images)"
            cells = [b.title, b.task, "—" if n_test is None else str(n_test), n_cls]
            if base is None:
                cells += ["skipped", ""] if "top1" not in o else [fmt(o["top1"]), fmt(o["top5"])]
            else:
                for m in ("top1", "top5"):
                    vo, vb = o.get(m), ba.get(m)
                    d = vo - vb if vo is not None and vb is not None else None
                    cells += [fmt(vo) if "top1" in o else "skipped", fmt(vb) if "top1" in ba else "skipped",
                              fmt(d, True)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table2(ours, base=None):
    """Markdown laid out like the paper's Table 2 (R@1/5/10 both ways; a row per model and Δ when compared)."""
    names = [n for n in RETRIEVAL if n in ours["retrieval"]]
    if not names:
        return "(no retrieval benchmarks evaluated)"
    sub = ["I→T R@1", "I→T R@5", "I→T R@10", "T→I R@1", "T→I R@5", "T→I R@10"]
    head = "| Model | " + " | ".join(f"{RETRIEVAL[n][0]} {s}" for n in names for s in sub) + " |"
    lines = [head, "|---|" + "---:|" * (len(sub) * len(names))]
    lo, lb = labels(ours, base)

    def row(label, res):
        cells = [(fmt(res["retrieval"][n][k]) if k in res["retrieval"].get(n, {}) else "skipped")
                 for n in names for k in RETRIEVAL_METRICS]
        return f"| {label} | " + " | ".join(cells) + " |"
    if base is not None:
        lines.append(row(lb, base))
    lines.append(row(lo, ours))
    if base is not None:
        deltas = []
        for n in names:
            o, b = ours["retrieval"].get(n, {}), base["retrieval"].get(n, {})
            deltas += [fmt(o[k] - b[k], True) if k in o and k in b else "—" for k in RETRIEVAL_METRICS]
        lines.append("| Δ | " + " | ".join(deltas) + " |")
    scored = [f"{RETRIEVAL[n][0]}: {r['n_texts']} captions of {r['n_images']} images ({r['captions_per_image']} per "
              f"image; {r['n_texts_in_files']} in the files)" for n in names
              for r in [ours["retrieval"][n]] if "n_texts" in r and "captions_per_image" in r]
    return "\n".join(lines) + ("\n\nScored: " + "; ".join(scored) + "." if scored else "")


def synthetic_table(ours, base=None):
    """Zero-shot top-1/top-5 per synthetic task and retrieval R@K, with a column per model and Δ when compared."""
    so, sb = ours["synthetic"], (base or {}).get("synthetic") or {}
    cols = [*labels(ours, base), "Δ"] if sb else [label_of(ours, "Ours")]
    lines = ["| Benchmark | n | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]

    def row(label, n, vo, vb):
        delta = vo - vb if vo is not None and vb is not None else None
        cells = [fmt(vo)] + ([fmt(vb), fmt(delta, True)] if sb else [])
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    for task, r in so["zeroshot"].items():
        b = sb.get("zeroshot", {}).get(task, {})
        for m in ("top1", "top5"):
            if "top1" in r and r.get(m) is not None:
                row(f"{task} {m}", r["n"], r[m], b.get(m))
    r, b = so["retrieval"] or {}, sb.get("retrieval") or {}
    for k in RETRIEVAL_METRICS:
        if k in r:
            row(f"retrieval {k}", r["n_images"], r[k], b.get(k))
    return "\n".join(lines)


def recall_table(ours, base=None):
    """Mean per-class recall per dataset (clip_benchmark's third number), a column per model and Δ when compared."""
    names = [n for n in BENCHMARKS if ours["zeroshot"].get(n, {}).get("mean_per_class_recall") is not None]
    if base is None:
        return "\n".join(["| Dataset | Mean per-class recall |", "|---|---:|"] + [
            f"| {BENCHMARKS[n].title} | {fmt(ours['zeroshot'][n]['mean_per_class_recall'])} |" for n in names])
    lines = ["| Dataset | {} | {} | Δ |".format(*labels(ours, base)), "|---|---:|---:|---:|"]
    for n in names:
        vo = ours["zeroshot"][n]["mean_per_class_recall"]
        vb = base["zeroshot"].get(n, {}).get("mean_per_class_recall")
        delta = None if vb is None else vo - vb
        lines.append(f"| {BENCHMARKS[n].title} | {fmt(vo)} | {fmt(vb)} | {fmt(delta, True)} |")
    return "\n".join(lines)


def nights_section(ours, comparison, base=None):
    nights = ours.get("nights")
    if nights and "skipped" in nights:
        return f"skipped: {nights['skipped']} ({nights['path']})"
    if comparison and comparison.get("nights"):
        return "| Split | n | {} | {} | Δ |\n|---|---:|---:|---:|---:|\n".format(*labels(ours, base)) + "\n".join(
            f"| {s} | {nights[s]['n']} | {fmt(v['ours'])} | {fmt(v['base'])} | {fmt(v['delta'], True)} |"
            for s, v in comparison["nights"].items())
    return "| Split | 2AFC | n |\n|---|---:|---:|\n" + "\n".join(
        f"| {s} | {fmt(v.get('2afc'))} | {v.get('n', 'skipped: ' + v.get('skipped', ''))} |"
        for s, v in nights.items())


def benchmark_titles(res):
    """(title, result) of every zero-shot, retrieval, NIGHTS split and probe entry of one model's results."""
    rows = [(BENCHMARKS[n].title, r) for n, r in res["zeroshot"].items()]
    rows += [(RETRIEVAL[n][0], r) for n, r in res["retrieval"].items()]
    nights = res.get("nights") or {}
    rows += ([("NIGHTS", nights)] if "skipped" in nights
             else [(f"NIGHTS {s}", r) for s, r in nights_splits(res).items()])
    rows += [(f"probe {p}", r) for p, r in (res.get("probes") or {}).items()]
    return rows


def skipped_lines(res):
    lines = []
    for title, r in benchmark_titles(res):
        if "skipped" in r:
            lines.append(f"- {title}: {r['skipped']} ({r['path']})")
        elif r.get("n_unreadable"):
            lines.append(f"- {title}: {r['n_unreadable']} unreadable images left out, e.g. {r['unreadable'][0]}")
    return lines


def per_model(ours, base, lines_of):
    """lines_of(results) of each model, under a heading per model when there are two."""
    if base is None:
        return "\n".join(lines_of(ours))
    return "\n\n".join(f"**{who}**\n\n" + "\n".join(lines) for who, lines in
                       zip(labels(ours, base), (lines_of(ours), lines_of(base))) if lines)


def skipped_section(ours, base=None):
    """Every skipped benchmark of each model, with the reason and the path looked at, and the sets that lost single
    unreadable images; under a heading per model when there are two."""
    return per_model(ours, base, skipped_lines)


def flagged_lines(res):
    """The sets whose images cover fewer classes than the set has, and the webdataset copies whose classnames.txt
    differs from our class names (where each difference is)."""
    lines = []
    for n, r in res["zeroshot"].items():
        if r.get("incomplete"):
            lines.append(f"- {BENCHMARKS[n].title}: {r['incomplete']} ({r['path']})")
        if r.get("classnames_differ") or r.get("classnames_reordered"):
            diffs = ", ".join(f"label {d['label']}: {d['copy']!r} (ours {d['ours']!r})"
                              for d in r.get("classnames_differ", []))
            lines.append(f"- {BENCHMARKS[n].title}: {r['classnames']}" + (f": {diffs}" if diffs else ""))
    return lines


def models_section(ours, base=None):
    """Which checkpoint each column is, with the architecture it was read as."""
    rows = []
    for res, default in ((ours, "Ours"), (base, "Base")):
        if res is not None:
            cfg = json.dumps(res.get("config"), separators=(",", ":")) if res.get("config") else "—"
            rows.append(f"| {label_of(res, default)} | `{res.get('checkpoint', '—')}` | `{cfg}` |")
    return "\n".join(["| Model | Checkpoint | Config |", "|---|---|---|", *rows])


def sources_lines(res):
    """Where each measured set was read from (a raw folder or a webdataset copy) and which test split that is."""
    return [f"- {title}: {r['split']} (`{r['path']}`)" for title, r in benchmark_titles(res)
            if "split" in r and "path" in r and "skipped" not in r]


def report_markdown(ours, base=None, comparison=None):
    """report.md: the models, Table 1, Figure 2's family means and the win count, Table 2, then whatever else was
    measured, what was flagged or skipped, and which files and splits were read."""
    lo, lb = labels(ours, base)
    parts = ["## Models", models_section(ours, base)]
    if base is not None:
        parts.append(f"Δ = {lo} − {lb}.")
    if ours["zeroshot"]:
        parts += ["## Zero-shot classification (Table 1)", table1(ours, base), "## Family means (Figure 2)"]
        if comparison is None:
            parts.append("| Family | Top-1 | Top-5 |\n|---|---:|---:|\n" + "\n".join(
                f"| {fam} | {fmt(v['top1'])} | {fmt(v['top5'])} |" for fam, v in ours["families"].items()))
        else:
            head = (f"| Family | {lo}@1 | {lb}@1 | Δ@1 | {lo}@5 | {lb}@5 | Δ@5 |\n"
                    "|---|---:|---:|---:|---:|---:|---:|\n")
            cells = lambda v: " | ".join(fmt(v.get(m, {}).get(k), k == "delta")  # noqa: E731
                                         for m in ("top1", "top5") for k in ("ours", "base", "delta"))
            parts.append(head + "\n".join(f"| {fam} | {cells(v)} |" for fam, v in comparison["families"].items()))
            parts.append(f"{lo} vs {lb}: {comparison['summary']}.")
        parts += ["## Mean per-class recall (clip_benchmark's `mean_per_class_recall`)", recall_table(ours, base)]
    if ours["retrieval"]:
        parts += ["## Retrieval (Table 2)", table2(ours, base)]
    if ours.get("synthetic"):
        parts += ["## Synthetic world (CPU demo)", synthetic_table(ours, base)]
    if ours.get("nights"):
        parts += ["## NIGHTS 2AFC", nights_section(ours, comparison, base)]
    if ours.get("probes"):
        parts += ["## Perceptual probes", "```json\n" + json.dumps(ours["probes"], indent=1) + "\n```"]
    flagged = per_model(ours, base, flagged_lines)
    if flagged:
        parts += ["## Flagged: classes without images, class names that differ from a webdataset copy's", flagged]
    gone = skipped_section(ours, base)
    if gone:
        parts += ["## Skipped (files not found, unreadable or failed)", gone]
    read = per_model(ours, base, sources_lines)
    if read:
        parts += ["## Files and test splits read", read]
    return "\n\n".join(parts) + "\n"

# -----------------------------------------------------------------------------------------------------------------
# 9. Scaling curves (Figures 3-4): every checkpoint of a run, against the samples it had seen


def run_checkpoints(run_dir):
    """[(epoch, path)] for the run's checkpoints named with a trailing epoch number (epoch_3.pt, epoch3.pt)."""
    out = []
    for f in os.listdir(run_dir):
        m = re.search(r"(\d+)\.pt$", f)
        if m:
            out.append((int(m.group(1)), os.path.join(run_dir, f)))
    return sorted(out)


def short_labels(paths, min_parts=1):
    """Names that tell the paths apart: the fewest trailing parts (at least min_parts) that differ for all of them.
    s0/pi, s1/pi -> "s0/pi", "s1/pi"; runs/pi/epoch_32.pt, runs/base/epoch_32.pt (min_parts 2) -> "pi/epoch_32.pt",
    "base/epoch_32.pt". The same path twice keeps its whole name."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for k in range(min_parts, max(map(len, parts)) + 1):
        tails = ["/".join(p[-k:]) for p in parts]
        if len(set(tails)) == len(tails):
            return tails
    return ["/".join(p) for p in parts]


def scaling_rows(res, epoch, samples, path):
    row = {"epoch": epoch, "samples_seen": samples, "checkpoint": path}
    for fam, v in res["families"].items():
        row[f"{fam} top1"], row[f"{fam} top5"] = v["top1"], v["top5"]
    for name, r in res["retrieval"].items():
        for k in RETRIEVAL_METRICS:
            row[f"{name} {k}"] = r.get(k)
    for task, r in ((res.get("synthetic") or {}).get("zeroshot") or {}).items():
        row[f"synthetic {task} top1"], row[f"synthetic {task} top5"] = r.get("top1"), r.get("top5")
    for k in RETRIEVAL_METRICS:
        if (res.get("synthetic") or {}).get("retrieval"):
            row[f"synthetic {k}"] = res["synthetic"]["retrieval"].get(k)
    return row


SCALING_KEYS = ("run", "epoch", "samples_seen", "checkpoint")  # the columns of scaling.csv that are not curves


def write_scaling(rows, out_dir):
    """scaling.csv (one row per run and checkpoint; `run` names each run by its path), scaling_fit.json (a, β of
    each run's own fit per curve: "<curve>" for one run, "<run>: <curve>" for several) and scaling.png (Figures 3-4:
    log-log, every run on the same axes)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = os.path.join(out_dir, "scaling.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    curves = [c for c in cols if c not in SCALING_KEYS]
    runs = list(dict.fromkeys(r.get("run", "") for r in rows))
    fits, drawn = {}, []
    for c in curves:
        for run in runs:  # each run its own fit: the runs share the figure's axes, never a fit
            pts = [(r["samples_seen"], r[c]) for r in rows if r.get("run", "") == run and r.get(c) is not None]
            fits[c if len(runs) == 1 else f"{run}: {c}"] = fit = fit_power_law(*zip(*pts)) if pts else None
            if fit and (c.endswith("top1") or c.endswith("_r1")) and c not in drawn:  # the paper's panels
                drawn.append(c)
    with open(os.path.join(out_dir, "scaling_fit.json"), "w") as f:
        json.dump(fits, f, indent=1)
    if drawn:
        draw_scaling(csv_path, os.path.join(out_dir, "scaling.png"), drawn)
    return fits


def draw_scaling(csv_path, png, curves):
    """scaling.png, drawn by `python plots.py scaling` from the CSV just written. plots.py imports fit_power_law from
    this file, and this file never imports plots.py (nor matplotlib, a dev requirement): without matplotlib the CSV
    and the fits still come out."""
    cmd = [sys.executable, os.path.join(HERE, "plots.py"), "scaling", csv_path, "--out", png,
           "--curves", ",".join(curves)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["plots.py failed"])[-1]
        print(f"no scaling.png ({why}); pip install -r requirements-dev.txt to draw it")

# -----------------------------------------------------------------------------------------------------------------
# 10. Command line

def load_model(checkpoint, preset=None, config=None, device="cpu"):
    """CLIP with a checkpoint's weights, the architecture found by model.config_for (--config, the config the run
    recorded in or beside the checkpoint, --model, else ViT-B/32)."""
    sd = load_checkpoint(checkpoint)
    saved = sd.get("config") if isinstance(sd.get("config"), dict) else None
    model = CLIP(config_for(checkpoint, preset=preset, config=config, saved=saved))
    load_state_dict_checked(model, sd, what=checkpoint)
    return model.to(device).eval()


def fingerprint(path, *extra):
    """Identifies a checkpoint file's contents cheaply (path, size, mtime) plus whatever else `extra` names (the
    tokenizer, the whole model config: one checkpoint read as ViT-B-32 and as ViT-B-32-quickgelu gives two
    different text towers, so two classifiers) for the classifier cache."""
    st = os.stat(path)
    key = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, *extra], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def n_measured(res):
    """How many benchmarks of one model's results have a number, not a skip."""
    if not res:
        return 0
    syn = res.get("synthetic") or {}
    counts = [sum("top1" in r for r in res["zeroshot"].values()), sum("i2t_r1" in r for r in res["retrieval"].values()),
              sum("2afc" in r for r in nights_splits(res).values()),
              sum("top1" in r for r in (syn.get("zeroshot") or {}).values()), "i2t_r1" in (syn.get("retrieval") or {}),
              sum("skipped" not in r for r in (res.get("probes") or {}).values())]
    return sum(counts)


def nothing_measured(res, what):
    """The one line evaluate.py exits with when a model's run measured nothing (a typo in --data-root, say)."""
    gone = [f"{title}: {r['skipped']} ({r['path']})" for title, r in benchmark_titles(res) if "skipped" in r]
    why = f"all {len(gone)} benchmarks were skipped, e.g. {gone[0]}" if gone else "no benchmark was asked for"
    return f"evaluate.py: nothing was measured for {what}: {why}; no results written"


class ResultsFile:
    """results.json ({"ours", "base", "comparison"}, each model with its label, checkpoint and config), rewritten
    whole after every benchmark through a temporary file and a rename, so a killed evaluation leaves the numbers it
    had measured and never a half-written file. Nothing is written until something has been measured."""

    def __init__(self, path):
        self.path, self.content = path, {"ours": None, "base": None, "comparison": None}

    def update(self, **parts):
        self.content.update(parts)
        if not n_measured(self.content["ours"]):
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.content, f, indent=1)
        os.replace(tmp, self.path)

    def progress(self, key, header, res):  # evaluate()'s on_result for model `key` ("ours" or "base")
        self.update(**{key: {**header, **res}})


def refuse_to_overwrite(out, names, overwrite):
    """Exit at once, before any model is loaded, if an earlier evaluation's results are in --out (as the training
    scripts refuse to overwrite a run); --overwrite replaces them."""
    there = [os.path.join(out, n) for n in names if os.path.exists(os.path.join(out, n))]
    if there and not overwrite:
        raise SystemExit(f"evaluate.py: {there[0]} exists (an earlier evaluation); give another --out, or --overwrite "
                         "to replace it")


def read_base_results(path):
    """An earlier run's results.json given to --compare: its "ours" (or the whole file, for a bare results dict)."""
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    res = res.get("ours", res) if isinstance(res, dict) else None
    if not isinstance(res, dict) or "zeroshot" not in res:
        raise SystemExit(f"evaluate.py: --compare {path} is not an evaluate.py results.json")
    return res


def build_parser():
    """The command line; --help prints this file's docstring (examples, layout) and every default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", help="plain state dict (torch.save(model.state_dict())) of the model to evaluate")
    p.add_argument("--model", type=preset_name,
                   help=f"architecture preset, one of {', '.join(MODEL_PRESETS)}, for a checkpoint without a recorded "
                        "config (e.g. OpenAI's weights)")
    p.add_argument("--config", help="CLIPConfig fields as JSON (default: config.json beside the checkpoint)")
    add_renamed(p, "--config-json", "--config", "config")
    p.add_argument("--merges", help="BPE merges file (bpe_simple_vocab_16e6.txt.gz format) the model was trained with")
    p.add_argument("--data-root", default="data",
                   help="one folder per dataset, or its webdataset copy wds_<name>, as the layout above")
    p.add_argument("--datasets", default="all", help=f"'all' or a comma list of: {', '.join(BENCHMARKS)}")
    p.add_argument("--retrieval", default="flickr30k,coco", help="comma list of: flickr30k, coco ('' for none)")
    p.add_argument("--captions-per-image", type=int, default=CAPTIONS_PER_IMAGE,
                   help="captions scored per retrieval image, the first ones in the file (0: all of them, as "
                        "clip_benchmark). 5 is the Karpathy test splits' protocol of the CLIP and PI papers: 25,000 "
                        "captions for COCO 5k, whose JSON has 25,010")
    p.add_argument("--nights", help="NIGHTS root (data.csv, ref/, distort/) for 2AFC on val / test splits")
    p.add_argument("--probes", help=f"'all' or a comma list of: {', '.join(PROBES)} (none by default)")
    p.add_argument("--synthetic", help="root of a synthetic_world.py world (demo): its zero-shot tasks, retrieval "
                                       "and, unless --nights is given, its NIGHTS stand-in")
    p.add_argument("--out", default="results", help="folder for results.json, report.md, scaling.csv")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier evaluation in --out (without it, evaluate.py refuses)")
    p.add_argument("--compare", help="base model: a checkpoint (evaluated the same way) or an earlier results.json")
    p.add_argument("--scaling", help="run folder(s), comma-separated, with per-epoch checkpoints (epoch_N.pt): "
                                     "Figures 3-4; each run is named by its path and fitted on its own")
    p.add_argument("--samples-per-epoch", type=int, help="training pairs per epoch (with --scaling)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (bf16 autocast on a GPU)")
    p.add_argument("--download", action="store_true", help="let torchvision download the sets it can")
    p.add_argument("--no-cache", action="store_true", help="do not keep text classifiers in <out>/cache")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    if not args.checkpoint and not args.scaling:
        p.error("give --checkpoint (and/or --scaling RUN_DIR)")
    if args.scaling and not args.samples_per_epoch:
        p.error("--scaling needs --samples-per-epoch (training pairs per epoch) to place checkpoints on the x axis")
    if args.captions_per_image < 0:
        p.error("--captions-per-image must be >= 0 (0: all)")
    return args


def main(argv=None):
    args = parse_args(argv)
    datasets = parse_names(args.datasets, list(BENCHMARKS), "dataset")
    retrieval = parse_names(args.retrieval, list(RETRIEVAL), "retrieval benchmark")
    probes = parse_names(args.probes, list(PROBES), "probe")
    refuse_to_overwrite(args.out, (["results.json", "report.md"] if args.checkpoint else [])
                        + (["scaling.csv", "scaling_fit.json"] if args.scaling else []), args.overwrite)
    runs = {d: run_checkpoints(d) for d in args.scaling.split(",")} if args.scaling else {}
    for run_dir, checkpoints in runs.items():  # all of them checked before hours of evaluation
        if not checkpoints:
            raise SystemExit(f"evaluate.py: --scaling {run_dir} has no per-epoch checkpoints (epoch_N.pt)")
    base = read_base_results(args.compare) if args.compare and args.compare.endswith(".json") else None
    if args.synthetic and not args.nights:
        args.nights = os.path.join(args.synthetic, "nights")
    os.makedirs(args.out, exist_ok=True)
    tokenizer = data.Tokenizer(args.merges)
    cache_dir = None if args.no_cache else os.path.join(args.out, "cache")

    def run(checkpoint, label, results=None, key=None):
        print(f"== {label}: {checkpoint}")
        model = load_model(checkpoint, args.model, args.config, args.device)
        tag = fingerprint(checkpoint, os.path.abspath(args.merges) if args.merges else None, asdict(model.config))
        header = {"label": label, "checkpoint": os.path.abspath(checkpoint), "config": asdict(model.config)}
        res = evaluate(model, tokenizer, args.data_root, datasets=datasets, retrieval=retrieval, nights=args.nights,
                       probes=probes, synthetic=args.synthetic, batch_size=args.batch_size, workers=args.workers,
                       cache_dir=cache_dir, cache_tag=tag, download=args.download,
                       captions_per_image=args.captions_per_image,
                       on_result=functools.partial(results.progress, key, header) if results else None)
        return {**header, **res}

    if args.checkpoint:
        compare_with(args, run, base)
    if args.scaling:
        scaling(args, run, runs)


def compare_with(args, run, base):
    """--checkpoint (and --compare): results.json, report.md; the models named by their checkpoints' paths."""
    paths = [args.checkpoint] + ([base.get("checkpoint", args.compare) if base else args.compare]
                                 if args.compare else [])
    names = short_labels(paths, min_parts=2)
    results = ResultsFile(os.path.join(args.out, "results.json"))
    ours = run(args.checkpoint, names[0], results, "ours")
    if not n_measured(ours):
        raise SystemExit(nothing_measured(ours, args.checkpoint))
    comparison = None
    if args.compare:
        base = {**base, "label": names[1]} if base else run(args.compare, names[1], results, "base")
        comparison = compare(ours, base)
    results.update(ours=ours, base=base, comparison=comparison)
    md = report_markdown(ours, base, comparison)
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    if comparison and ours["zeroshot"]:
        print(f"{names[0]} vs {names[1]}: {comparison['summary']}")


def scaling(args, run, runs):
    """--scaling: every checkpoint of each run (named by its path), scaling.csv, each run's own fits, scaling.png."""
    rows = []
    for run_dir, label in zip(runs, short_labels(list(runs))):  # several runs (PI, baseline) share the figure's axes
        for epoch, path in runs[run_dir]:
            res = run(path, f"{label} epoch {epoch}")
            rows.append({"run": label, **scaling_rows(res, epoch, epoch * args.samples_per_epoch, path)})
    if not any(v is not None for r in rows for k, v in r.items() if k not in SCALING_KEYS):
        raise SystemExit(f"evaluate.py: nothing was measured for any checkpoint of {args.scaling}; "
                         "no scaling.csv written")
    fits = write_scaling(rows, args.out)
    print("power-law exponents β:", json.dumps({k: (v or {}).get("beta") for k, v in fits.items()}, indent=1))


if __name__ == "__main__":
    main()
