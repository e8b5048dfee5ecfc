"""
Evaluate a CLIP checkpoint the way the PI paper does: zero-shot classification on its 29 datasets (Table 1, Figure 2),
Flickr30k / COCO retrieval (Table 2), scaling curves over a run's checkpoints (Figures 3-4), NIGHTS 2AFC, and the
seeds' perceptual probes (TID2013, texture-shape bias, noise sensitivity).

    python evaluate.py --checkpoint runs/pi/epoch_32.pt --merges bpe_simple_vocab_16e6.txt.gz \
        --data-root /data/eval --datasets all --retrieval flickr30k,coco --nights /data/nights \
        --out results/pi --compare runs/base/epoch_32.pt
    python evaluate.py --scaling runs/pi --samples-per-epoch 15000000 --merges ... --data-root ... --datasets all
    python evaluate.py --checkpoint demo/pi.pt --compare demo/base.pt --model tiny --merges ... \
        --datasets "" --retrieval "" --synthetic demo/world        # the CPU demo's synthetic world

From training code: zero_shot_eval(model, tokenizer, "imagenet1k", root), retrieval_eval(model, tokenizer, json),
nights_eval(model, nights_root), folder_zero_shot_eval(...), synthetic_eval(model, tokenizer, world_root).

Everything reads from one folder per dataset under --data-root; a dataset whose files are missing is reported as
skipped (with the path looked at), never a crash of the run. Layout (torchvision's own layout wherever torchvision has
the set; `<R>` is --data-root):

    imagenet1k        <R>/imagenet1k/val/<wnid>/*.JPEG, or torchvision ImageNet(<R>/imagenet1k, split="val")
    imagenet-a/-o/-r  <R>/imagenet-a/<wnid>/*.jpg   (the released tars, extracted)
    imagenet_sketch   <R>/imagenet_sketch/<wnid>/*.JPEG   (the zip's sketch/ folder)
    imagenetv2        <R>/imagenetv2/<0..999>/*.jpeg   (matched-frequency release; folders are class indices)
    objectnet         <R>/objectnet/objectnet-1.0/{images,mappings}/
    cifar10/cifar100, mnist, svhn, pcam, dtd, flowers, pets, cars, food101, fgvc_aircraft, country211, gtsrb,
    renderedsst2, stl10, eurosat
                      torchvision.datasets.X(root=<R>/<name>, test split; --download lets torchvision fetch them)
    caltech101        <R>/caltech101/[caltech101/]101_ObjectCategories/<class>/*.jpg
    clevr_count_all, clevr_closest_object_distance
                      <R>/clevr/[clevr/]CLEVR_v1.0/{images/val, scenes/CLEVR_val_scenes.json}
    kitti_closest_vehicle_distance
                      <R>/kitti/[Kitti/raw/]training/{image_2,label_2}/ (+ optional <R>/kitti/test_ids.txt)
    resisc45          <R>/resisc45/[NWPU-RESISC45/]<class>/*.jpg
    voc2007           <R>/voc2007/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main/test.txt}
    flickr30k         <R>/flickr30k/dataset_flickr30k.json + images in <R>/flickr30k/[flickr30k-images/|images/]
    coco              <R>/coco/dataset_coco.json + <R>/coco/val2014/*.jpg  (Karpathy split JSON, `filepath` field)
    tid2013           <R>/tid2013/{mos_with_names.txt, reference_images/, distorted_images/}
    cue-conflict      <R>/cue-conflict/<shape>/<shape>N-<texture>M.png  (Geirhos et al.)
    CIFAR-100-C       <R>/CIFAR-100-C/{gaussian_noise.npy, labels.npy}  (+ <R>/cifar100 for the clean accuracy)

Where a VTAB test split cannot be rebuilt without TensorFlow Datasets (EuroSAT, RESISC45, Caltech-101, KITTI) we use a
fixed split of the same size and say so in the dataset's `split` note in the results; #test in the tables is always
the number of images actually evaluated. Accuracies and recalls are in percent.
"""

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import data
from model import CLIP, CLIPConfig, autocast, load_checkpoint, load_state_dict_checked, two_afc_accuracy

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")

# -----------------------------------------------------------------------------------------------------------------
# 1. Metrics


def topk_accuracy(logits, targets, k):
    """Fraction of rows whose target is among the k highest logits. Ties are split evenly: a target tied with e
    classes (itself included) behind g strictly higher ones counts (k - g) / e, clipped to [0, 1], which is the
    expected top-k under random tie-breaking (a constant model gets k/C, not 0 or 1). Without ties this is the usual
    top-k; k >= #classes gives 1."""
    target_logit = logits.gather(1, targets.view(-1, 1))
    greater = (logits > target_logit).sum(1).float()
    equal = (logits == target_logit).sum(1).float()
    return ((k - greater) / equal).clamp(0, 1).mean().item()


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
# 2. Encoding: images once per dataset in big batches, bf16 autocast on GPU




def make_loader(ds, batch_size, workers, device):
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False)


@torch.no_grad()
def encode_images(model, loader, device, desc="images"):
    """Unit-norm float32 image embeddings [N, D] (on CPU) and the loader's second item stacked [N]."""
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, leave=False, disable=None):
        with autocast(device):
            f = model.encode_image(images.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=-1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, batch_size=1024):
    """Unit-norm float32 text embeddings [len(texts), D] (on CPU)."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i:i + batch_size]).to(device)
        with autocast(device):
            f = model.encode_text(tokens)
        out.append(F.normalize(f.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, templates, device, batch_size=1024):
    """SPEC §5 (CLIP's prompt ensembling): for each class, encode every template filled with the class name,
    L2-normalise each, average, re-normalise. Returns [D, C] so that logits = 100 * image_emb @ classifier."""
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
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(clf, path)
    return clf

# -----------------------------------------------------------------------------------------------------------------
# 3. The paper's 29 classification sets (Table 1): family, task, #test and #classes as the paper lists them

FAMILIES = ["ImageNet", "ImageNet OOD", "VTAB", "Fine-grained & Specialty", "Misc. / Domain & Small"]


@dataclass
class Benchmark:
    title: str
    family: str
    task: str
    n_test: int  # as in the paper's Table 1
    n_classes: int
    folder: str = ""  # under --data-root; defaults to the benchmark's name


_F = FAMILIES
BENCHMARKS = {
    "imagenet1k": Benchmark("ImageNet-1k", _F[0], "Visual recog.", 50000, 1000),
    "imagenet-a": Benchmark("ImageNet-A", _F[1], "Visual recog.", 7500, 200),
    "imagenet-o": Benchmark("ImageNet-O", _F[1], "Visual recog.", 2000, 200),
    "imagenet-r": Benchmark("ImageNet-R", _F[1], "Visual recog.", 30000, 200),
    "imagenet_sketch": Benchmark("ImageNet-Sketch", _F[1], "Visual recog.", 50889, 1000),
    "imagenetv2": Benchmark("ImageNet-V2", _F[1], "Visual recog.", 10000, 1000),
    "objectnet": Benchmark("ObjectNet", _F[1], "Visual recog.", 18574, 113),
    "cifar100": Benchmark("CIFAR-100", _F[2], "Visual recog.", 10000, 100),
    "caltech101": Benchmark("Caltech-101", _F[2], "Object recog.", 6085, 102),
    "clevr_closest_object_distance": Benchmark("CLEVR-Dist.", _F[2], "Distance pred.", 15000, 6, "clevr"),
    "clevr_count_all": Benchmark("CLEVR-Count", _F[2], "Counting", 15000, 8, "clevr"),
    "kitti_closest_vehicle_distance": Benchmark("KITTI-CVD", _F[2], "Distance pred.", 711, 4, "kitti"),
    "dtd": Benchmark("DTD", _F[2], "Texture cls.", 1880, 47),
    "eurosat": Benchmark("EuroSAT", _F[2], "Satellite recog.", 5400, 10),
    "flowers": Benchmark("Flowers-102", _F[2], "Flower recog.", 6149, 102),
    "pets": Benchmark("Oxford-IIIT Pet", _F[2], "Pet cls.", 3669, 37),
    "resisc45": Benchmark("RESISC45", _F[2], "Remote-sens.", 6300, 45),
    "svhn": Benchmark("SVHN", _F[2], "Digit recog.", 26032, 10),
    "pcam": Benchmark("PCAM", _F[2], "Histopath. cls.", 32768, 2),
    "cars": Benchmark("Stanford Cars", _F[3], "Vehicle recog.", 8041, 196),
    "food101": Benchmark("Food-101", _F[3], "Food recog.", 25250, 101),
    "fgvc_aircraft": Benchmark("FGVC-Aircraft", _F[3], "Aircraft recog.", 3333, 100),
    "voc2007": Benchmark("PASCAL VOC 07", _F[3], "Object recog.", 14976, 20),
    "cifar10": Benchmark("CIFAR-10", _F[4], "Visual recog.", 10000, 10),
    "country211": Benchmark("Country211", _F[4], "Geolocation", 21100, 211),
    "gtsrb": Benchmark("GTSRB", _F[4], "Traffic-sign recog.", 12630, 43),
    "mnist": Benchmark("MNIST", _F[4], "Digit recog.", 10000, 10),
    "renderedsst2": Benchmark("Rendered-SST2", _F[4], "Sentiment cls.", 1821, 2),
    "stl10": Benchmark("STL-10", _F[4], "Visual recog.", 8000, 10),
}
RETRIEVAL = {"flickr30k": ("Flickr 1K Test", "dataset_flickr30k.json"),  # name: (Table 2 heading, Karpathy JSON)
             "coco": ("MS-COCO 2014 5K Test", "dataset_coco.json")}
PROBES = ("tid2013", "cue_conflict", "noise")

_PROMPTS = None


def prompts():
    """zeroshot_prompts.json: CLIP's class names and templates, as clip_benchmark ships them (see its _source)."""
    global _PROMPTS
    if _PROMPTS is None:
        with open(os.path.join(HERE, "zeroshot_prompts.json")) as f:
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

# -----------------------------------------------------------------------------------------------------------------
# 4. Reading the datasets (torchvision where it has the set, small readers for the rest)


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


def build_dataset(name, root, transform, download=False):
    """Test split of benchmark `name` read from `root` -> (dataset of (image, label), class names, split note).
    Raises FileNotFoundError / RuntimeError when files are missing."""
    import torchvision.datasets as tvd
    entry = prompts()[name]
    classes, note = entry["classes"], "test"
    tf = RGB(transform)
    tv = dict(root=root, transform=tf, download=download)
    if name in ("cifar10", "cifar100"):
        ds = (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(train=False, **tv)
    elif name == "mnist":
        ds = tvd.MNIST(train=False, **tv)
    elif name in ("dtd", "flowers", "svhn", "pcam", "cars", "food101", "country211", "gtsrb", "renderedsst2", "stl10"):
        cls = dict(dtd=tvd.DTD, flowers=tvd.Flowers102, svhn=tvd.SVHN, pcam=tvd.PCAM, cars=tvd.StanfordCars,
                   food101=tvd.Food101, country211=tvd.Country211, gtsrb=tvd.GTSRB, renderedsst2=tvd.RenderedSST2,
                   stl10=tvd.STL10)[name]
        ds = cls(split="test", **tv)  # DTD: partition 1, as clip_benchmark
    elif name == "pets":
        ds = tvd.OxfordIIITPet(split="test", target_types="category", **tv)
    elif name == "fgvc_aircraft":
        ds = tvd.FGVCAircraft(split="test", annotation_level="variant", **tv)
    elif name == "eurosat":  # torchvision has no split; VTAB tests on 20% (5,400)
        full = tvd.EuroSAT(**tv)
        ds = Subset(full, [i for i, _ in fixed_subset(list(enumerate(full.targets)), 0.2)])
        note = "fixed 20% subset (seed 0) of torchvision EuroSAT, VTAB's test size"
    elif name == "imagenet1k":
        names = imagenet_names()
        if os.path.isdir(os.path.join(root, "val")):
            ds = ImageList(folder_items(os.path.join(root, "val"), {w: i for i, w in enumerate(names)}), transform)
        elif os.path.exists(os.path.join(root, "ILSVRC2012_devkit_t12.tar.gz")):
            ds = tvd.ImageNet(root, split="val", transform=tf)  # unpacks the archives on first use
        else:
            raise FileNotFoundError(f"neither {root}/val/<wnid>/ nor torchvision ImageNet's archives in {root}")
        note = "val"
    elif name in ("imagenet-a", "imagenet-o", "imagenet-r", "imagenet_sketch"):
        names = imagenet_names()  # folders are wnids; the class list is the wnids present, in ImageNet order
        folder = find_dir(root, "sketch", "") if name == "imagenet_sketch" else root
        wnids = [d for d in class_folders(folder) if d in names]
        classes = [names[w] for w in wnids]
        ds = ImageList(folder_items(folder, {w: i for i, w in enumerate(wnids)}), transform)
    elif name == "imagenetv2":
        folder = find_dir(root, "imagenetv2-matched-frequency-format-val", "")
        classes = prompts()["imagenet1k"]["classes"]
        ds = ImageList(folder_items(folder, {str(i): i for i in range(1000)}), transform)
    elif name == "objectnet":
        ds, classes = objectnet(root, transform)
    elif name == "caltech101":
        ds, note = caltech101(root, transform)
    elif name.startswith("clevr_"):
        ds = clevr(root, name, transform)
        note = "CLEVR val (VTAB's test split)"
    elif name == "kitti_closest_vehicle_distance":
        ds, note = kitti_closest_vehicle_distance(root, transform)
    elif name == "resisc45":
        folder = find_dir(root, "NWPU-RESISC45", "")
        dirs = class_folders(folder)
        classes = [d.replace("_", " ") for d in dirs]
        ds = ImageList(fixed_subset(folder_items(folder, {d: i for i, d in enumerate(dirs)}), 0.2), transform)
        note = "fixed 20% subset (seed 0), VTAB's test size"
    elif name == "voc2007":
        ds = voc2007_crops(root, transform)
    else:
        raise KeyError(name)
    if classes is None:  # torchvision's own class list (clip_benchmark does the same)
        classes = ds.classes if name != "food101" else [c.replace("_", " ") for c in ds.classes]
    return ds, classes, note


def objectnet(root, transform):
    """ObjectNet's 113 classes that map onto ImageNet, named and ordered as clip_benchmark (from wise-ft) does."""
    base = find_dir(root, "objectnet-1.0", "")
    with open(os.path.join(base, "mappings", "folder_to_objectnet_label.json")) as f:
        folder_to_label = json.load(f)
    with open(os.path.join(base, "mappings", "objectnet_to_imagenet_1k.json")) as f:
        in_imagenet = set(json.load(f))
    folders = sorted(d for d, lab in folder_to_label.items() if lab in in_imagenet)
    classes = [folder_to_label[d].lower() for d in folders]
    items = folder_items(os.path.join(base, "images"), {d: i for i, d in enumerate(folders)})
    return ImageList(items, transform), classes


def caltech101(root, transform, n_train=30):
    """All 102 folders (with BACKGROUND_Google, as VTAB and the paper's #classes) in case-sensitive order; the test
    split is everything but the first 30 images of each class, VTAB's split rule (TFDS draws its 30 at random)."""
    folder = find_dir(root, "caltech101/101_ObjectCategories", "101_ObjectCategories")
    items = []
    for i, d in enumerate(class_folders(folder)):
        items += [(p, i) for p in list_images(os.path.join(folder, d))[n_train:]]
    return ImageList(items, transform), "all but the first 30 images per class (VTAB's rule, not its draw)"


def clevr(root, name, transform):
    """CLEVR val scenes -> VTAB's count_all (objects - 3) or closest_object_distance (depth of the nearest object
    binned at 8, 8.5, 9, 9.5, 10) labels."""
    base = find_dir(root, "CLEVR_v1.0", "clevr/CLEVR_v1.0")
    with open(os.path.join(base, "scenes", "CLEVR_val_scenes.json")) as f:
        scenes = json.load(f)["scenes"]
    thresholds = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
    items = []
    for s in scenes:
        if name == "clevr_count_all":
            label = len(s["objects"]) - 3
        else:
            depth = min(o["pixel_coords"][2] for o in s["objects"])
            label = int(np.max(np.where(thresholds - depth < 0)))
        items.append((os.path.join(base, "images", "val", s["image_filename"]), label))
    return ImageList(items, transform)


def kitti_closest_vehicle_distance(root, transform):
    """VTAB's KITTI task: depth of the nearest Car/Van/Truck binned at 8 m and 20 m, or 'no vehicle'. VTAB tests on
    TFDS's kitti validation split (711 images, chosen by drive); give its image ids in test_ids.txt to use it,
    otherwise every labelled training image is evaluated."""
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
        label = 0 if depth < 8 else 1 if depth < 20 else 2 if depth < 999 else 3
        items.append((os.path.join(base, "image_2", i + ".png"), label))
    return ImageList(items, transform), note


def voc2007_crops(root, transform):
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
    return ImageList(items, transform)

# -----------------------------------------------------------------------------------------------------------------
# 5. Zero-shot classification and retrieval


class DatasetUnavailable(Exception):
    """A benchmark's files are missing or incomplete: the run reports it as skipped and goes on."""


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
    """Zero-shot top-1 / top-5 (percent) of `model` on benchmark `name` read from `root` (= <data-root>/<folder>).
    top5 is None where #classes <= 5 (it would be 100 by construction). Importable from train_clip.py."""
    transform = transform or data.eval_transform(model.config.image_size)
    try:
        ds, classnames, note = build_dataset(name, root, transform, download)
    except (OSError, RuntimeError, ImportError, KeyError, ValueError) as e:  # files missing / incomplete
        raise DatasetUnavailable(f"{type(e).__name__}: {e}") from e
    if len(ds) == 0:
        raise DatasetUnavailable(f"no images found under {root}")
    r = zero_shot_on(model, tokenizer, ds, classnames, prompts()[name]["templates"], batch_size, workers, cache_dir,
                     cache_tag, desc=name)
    return {**r, "split": note}


def zero_shot_on(model, tokenizer, ds, classnames, templates, batch_size=256, workers=4, cache_dir=None, cache_tag=None,
                 desc="zero-shot"):
    """Top-1 / top-5 (percent) on a dataset of (image, class index); top5 None where #classes <= 5."""
    device = _device_of(model)
    with eval_mode(model):
        clf = cached_classifier(model, tokenizer, classnames, templates, device, cache_dir, cache_tag)
        feats, labels = encode_images(model, make_loader(ds, batch_size, workers, device), device, desc=desc)
    logits = 100 * feats @ clf
    top5 = 100 * topk_accuracy(logits, labels, 5) if len(classnames) > 5 else None
    return {"top1": 100 * topk_accuracy(logits, labels, 1), "top5": top5, "n": len(ds), "n_classes": len(classnames)}


def folder_zero_shot_eval(model, tokenizer, folder, classnames, templates, transform=None, batch_size=256, workers=4):
    """Zero-shot on an ImageFolder tree <folder>/<class>/*.png whose sorted folders are named by `classnames`
    (the synthetic world's tasks; also handy for any custom set)."""
    transform = transform or data.eval_transform(model.config.image_size)
    dirs = class_folders(folder)
    if len(dirs) != len(classnames):
        raise ValueError(f"{folder} has {len(dirs)} class folders but {len(classnames)} class names were given")
    ds = ImageList(folder_items(folder, {d: i for i, d in enumerate(dirs)}), transform)
    return zero_shot_on(model, tokenizer, ds, classnames, templates, batch_size, workers, desc=os.path.basename(folder))


class KarpathyRetrieval(Dataset):
    """Karpathy's split JSON ({"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}): the
    `test` images and the first 5 captions of each (the any-of-5 convention). Items are (image, image index)."""

    def __init__(self, json_path, image_root, transform, split="test", captions_per_image=5):
        with open(json_path) as f:
            images = [im for im in json.load(f)["images"] if im["split"] == split]
        rel = [os.path.join(im.get("filepath", ""), im["filename"]) for im in images]
        roots = [image_root] + [os.path.join(image_root, d) for d in ("flickr30k-images", "images")]
        found = [r for r in roots if rel and os.path.exists(os.path.join(r, rel[0]))]
        if not found:
            raise FileNotFoundError(f"{rel[0] if rel else 'no test images'} under any of " + ", ".join(roots))
        self.paths = [os.path.join(found[0], r) for r in rel]
        self.captions = [[s["raw"].strip() for s in im["sentences"][:captions_per_image]] for im in images]
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), i


def retrieval_eval(model, tokenizer, json_path, image_root=None, transform=None, batch_size=256, workers=4):
    """Table 2: I->T and T->I R@1/5/10 (percent) on the test split of a Karpathy-format JSON (Flickr30k 1k test,
    COCO 5k test); images are looked up under image_root (default: the JSON's folder)."""
    device = _device_of(model)
    transform = transform or data.eval_transform(model.config.image_size)
    ds = KarpathyRetrieval(json_path, image_root or os.path.dirname(json_path), transform)
    name = os.path.basename(json_path)
    texts = [c for caps in ds.captions for c in caps]
    text_to_image = [i for i, caps in enumerate(ds.captions) for _ in caps]
    with eval_mode(model):
        image_emb, _ = encode_images(model, make_loader(ds, batch_size, workers, device), device, desc=name)
        text_emb = encode_texts(model, tokenizer, texts, device)
    return {**retrieval_metrics(image_emb, text_emb, text_to_image), "n_images": len(ds), "n_texts": len(texts)}

# -----------------------------------------------------------------------------------------------------------------
# 6. NIGHTS 2AFC (stage 1's dataset and metric) and the seeds' perceptual probes

NIGHTS_EVAL_SPLITS = ("val", "test_imagenet", "test_no_imagenet")


@torch.no_grad()
def nights_eval(model, root, batch_size=128, workers=4):
    """2AFC accuracy (percent) on NIGHTS val, test_imagenet, test_no_imagenet, and their size-weighted test mean
    (DreamSim's overall score). Uses data.NightsTriplets and model.two_afc_accuracy."""
    device = _device_of(model)
    out = {}
    with eval_mode(model):
        for split in NIGHTS_EVAL_SPLITS:
            try:
                ds = data.NightsTriplets(root, split, image_size=model.config.image_size)  # no augmentation
            except (FileNotFoundError, RuntimeError, ValueError) as e:
                out[split] = {"skipped": str(e), "path": root}
                continue
            emb = {"ref": [], "left": [], "right": []}
            labels = []
            for ref, left, right, label in tqdm(make_loader(ds, batch_size, workers, device), desc=f"nights {split}",
                                                leave=False, disable=None):
                with autocast(device):  # one forward for all three images
                    f = model.encode_image(torch.cat([ref, left, right]).to(device, non_blocking=True)).float().cpu()
                for key, part in zip(emb, f.chunk(3)):
                    emb[key].append(part)
                labels.append(torch.as_tensor(label).float())
            acc = two_afc_accuracy(*(torch.cat(v) for v in emb.values()), torch.cat(labels))
            out[split] = {"2afc": 100 * float(acc), "n": len(ds)}
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
    index = {p: i for i, p in enumerate(paths)}
    with eval_mode(model):
        emb, _ = encode_images(model, make_loader(ImageList([(p, 0) for p in paths], transform), batch_size, workers,
                                                  device), device, desc="tid2013")
    sim = np.array([float(emb[index[r]] @ emb[index[d]]) for r, d in pairs])
    return {"pearson": pearson(sim, mos), "spearman": spearman(sim, mos), "n": len(pairs)}


def cue_conflict_eval(model, tokenizer, root, transform=None, batch_size=256, workers=4):
    """Texture-shape bias on Geirhos et al.'s cue-conflict images (<shape>/<shape>N-<texture>M.png; images whose
    shape and texture class agree are left out). texture_bias (SPEC §6): the share of images where the texture
    class's prompt beats the shape class's. shape_bias (Geirhos' protocol): among images whose 16-way zero-shot
    decision is the shape or the texture class, the share decided by shape."""
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
    with eval_mode(model):
        clf = zero_shot_classifier(model, tokenizer, classes, prompts()["imagenet1k"]["templates"], device)
        emb, shape = encode_images(model, make_loader(ImageList(items, transform), batch_size, workers, device), device,
                                   desc="cue-conflict")
    logits, texture = emb @ clf, torch.tensor(textures)
    rows = torch.arange(len(items))
    tex_wins = (logits[rows, texture] > logits[rows, shape]).sum().item()
    shape_wins = (logits[rows, shape] > logits[rows, texture]).sum().item()
    pred = logits.argmax(1)
    by_shape, by_texture = (pred == shape).sum().item(), (pred == texture).sum().item()
    return {"texture_bias": tex_wins / max(tex_wins + shape_wins, 1),
            "shape_bias": by_shape / max(by_shape + by_texture, 1), "n": len(items)}


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
        feats, y = encode_images(model, loader, device, desc="cifar100-c")
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
# 7. One model, every benchmark: a dict with every number, missing data reported as skipped


def skipped(reason, path):
    return {"skipped": reason, "path": path}


def evaluate(model, tokenizer, data_root, datasets=(), retrieval=(), nights=None, probes=(), synthetic=None,
             batch_size=256, workers=4, cache_dir=None, cache_tag=None, download=False, log=print):
    """Everything the report needs for one model. Numbers are percentages (probe correlations and biases are
    fractions). A benchmark whose files are missing is recorded as {"skipped": why, "path": where} and the run goes on.
    synthetic: root of data.make_synthetic_world (the CPU demo)."""
    res = {"units": "percent", "zeroshot": {}, "families": {}, "retrieval": {}, "nights": None, "probes": {},
           "synthetic": None}
    kw = dict(batch_size=batch_size, workers=workers)
    for name in datasets:
        root = os.path.join(data_root, BENCHMARKS[name].folder or name)
        if not os.path.isdir(root) and not download:
            r = skipped("missing", root)
        else:
            try:
                r = zero_shot_eval(model, tokenizer, name, root, cache_dir=cache_dir, cache_tag=cache_tag,
                                   download=download, **kw)
            except DatasetUnavailable as e:
                r = skipped(str(e), root)
        res["zeroshot"][name] = r
        log(f"{name:32s} top1 {r['top1']:5.1f}  top5 {_f(r['top5']):>5s}  ({r['n']} images)" if "top1" in r
            else f"{name:32s} skipped ({r['skipped']}: {r['path']})")
    for metric in ("top1", "top5"):
        for fam, v in family_means(res["zeroshot"], metric).items():
            res["families"].setdefault(fam, {})[metric] = v
    for name in retrieval:
        root = os.path.join(data_root, name)
        json_path = os.path.join(root, RETRIEVAL[name][1])
        try:
            if not os.path.exists(json_path):
                raise FileNotFoundError(f"missing {json_path}")
            r = retrieval_eval(model, tokenizer, json_path, root, **kw)
            log(f"{name:32s} " + "  ".join(f"{k} {r[k]:5.1f}" for k in RETRIEVAL_METRICS))
        except FileNotFoundError as e:
            r = skipped(str(e), root)
            log(f"{name:32s} skipped ({e})")
        res["retrieval"][name] = r
    if nights:
        res["nights"] = nights_eval(model, nights, **kw) if os.path.isdir(nights) else skipped("missing", nights)
        log(f"{'nights':32s} {json.dumps(res['nights'])}")
    if synthetic:
        res["synthetic"] = synthetic_eval(model, tokenizer, synthetic, **kw)
        log(f"{'synthetic':32s} {json.dumps(res['synthetic'])}")
    for probe in probes:
        res["probes"][probe] = run_probe(probe, model, tokenizer, data_root, res, kw)
        log(f"{probe:32s} {json.dumps(res['probes'][probe])}")
    return res


def run_probe(probe, model, tokenizer, data_root, res, kw):
    """The seeds' probes; each needs its files under --data-root (see the module docstring)."""
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


def _vs(o, b, keys):
    """{key: {ours, base, delta}} for the keys both results have a number for."""
    return {k: {"ours": o[k], "base": b[k], "delta": o[k] - b[k]} for k in keys
            if o.get(k) is not None and b.get(k) is not None}


def compare(ours, base):
    """Ours vs base on the datasets both evaluated: per-dataset Δ (pp), family means of ours / base / Δ (Figure 2),
    and the paper's win/tie/loss count on top-1, where a tie is a Δ that rounds to 0.0 at the paper's one decimal."""
    zo, zb = ours["zeroshot"], base["zeroshot"]
    both = [n for n in BENCHMARKS if "top1" in zo.get(n, {}) and "top1" in zb.get(n, {})]
    datasets = {n: _vs(zo[n], zb[n], ("top1", "top5")) for n in both}
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
    retrieval = {n: _vs(ours["retrieval"][n], base["retrieval"][n], RETRIEVAL_METRICS)
                 for n in RETRIEVAL if n in ours["retrieval"] and n in base["retrieval"]}
    synthetic = None
    so, sb = ours.get("synthetic"), base.get("synthetic")
    if so and sb:
        synthetic = {"zeroshot": {t: _vs(r, sb["zeroshot"].get(t, {}), ("top1", "top5"))
                                  for t, r in so["zeroshot"].items()},
                     "retrieval": _vs(so["retrieval"], sb["retrieval"], RETRIEVAL_METRICS)}
    no, nb = ours.get("nights") or {}, base.get("nights") or {}
    nights = {split: _vs(no[split], nb[split], ("2afc",))["2afc"] for split in no
              if "2afc" in no[split] and "2afc" in nb.get(split, {})} or None
    summary = (f"better on {count['win']} of {len(both)} classification benchmarks (top-1; "
               f"{count['tie']} ties, {count['loss']} losses)")
    return {"datasets": datasets, "families": families, "top1_count": count, "retrieval": retrieval,
            "synthetic": synthetic, "nights": nights, "summary": summary}


def _f(v, signed=False):
    return "—" if v is None else (f"{v:+.1f}" if signed else f"{v:.1f}")


def table1(ours, base=None):
    """Markdown laid out like the paper's Table 1 (with Ours/Base/Δ columns when a base model is given)."""
    if base is None:
        head = "| Dataset | Task | #Test | #Cls | Top-1 | Top-5 |\n|---|---|---:|---:|---:|---:|"
    else:
        head = ("| Dataset | Task | #Test | #Cls | Ours@1 | Base@1 | Δ@1 | Ours@5 | Base@5 | Δ@5 |\n"
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
            cells = [b.title, b.task, "—" if n_test is None else str(n_test), str(o.get("n_classes", b.n_classes))]
            if base is None:
                cells += ["skipped", ""] if "top1" not in o else [_f(o["top1"]), _f(o["top5"])]
            else:
                for m in ("top1", "top5"):
                    vo, vb = o.get(m), ba.get(m)
                    d = vo - vb if vo is not None and vb is not None else None
                    cells += [_f(vo) if "top1" in o else "skipped", _f(vb) if "top1" in ba else "skipped", _f(d, True)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table2(ours, base=None):
    """Markdown laid out like the paper's Table 2 (R@1/5/10 both ways; Base, Ours and Δ rows when compared)."""
    names = [n for n in RETRIEVAL if n in ours["retrieval"]]
    if not names:
        return "(no retrieval benchmarks evaluated)"
    sub = ["I→T R@1", "I→T R@5", "I→T R@10", "T→I R@1", "T→I R@5", "T→I R@10"]
    head = "| Model | " + " | ".join(f"{RETRIEVAL[n][0]} {s}" for n in names for s in sub) + " |"
    lines = [head, "|---|" + "---:|" * (len(sub) * len(names))]

    def row(label, res):
        cells = [(_f(res["retrieval"][n][k]) if k in res["retrieval"].get(n, {}) else "skipped")
                 for n in names for k in RETRIEVAL_METRICS]
        return f"| {label} | " + " | ".join(cells) + " |"
    if base is not None:
        lines.append(row("Base", base))
    lines.append(row("Ours", ours))
    if base is not None:
        deltas = []
        for n in names:
            o, b = ours["retrieval"].get(n, {}), base["retrieval"].get(n, {})
            deltas += [_f(o[k] - b[k], True) if k in o and k in b else "—" for k in RETRIEVAL_METRICS]
        lines.append("| Δ | " + " | ".join(deltas) + " |")
    return "\n".join(lines)


def synthetic_table(ours, base=None):
    """Zero-shot top-1/top-5 per synthetic task and retrieval R@K, with Base and Δ columns when compared."""
    so, sb = ours["synthetic"], (base or {}).get("synthetic") or {}
    cols = ["Ours", "Base", "Δ"] if sb else ["Ours"]
    lines = ["| Benchmark | n | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]

    def row(label, n, vo, vb):
        cells = [_f(vo)] + ([_f(vb), _f(vo - vb if vo is not None and vb is not None else None, True)] if sb else [])
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


def report_markdown(ours, base=None, comparison=None):
    """report.md: Table 1, Figure 2's family means and the win count, Table 2, then whatever else was measured."""
    parts = []
    if ours["zeroshot"]:
        parts += ["## Zero-shot classification (Table 1)", table1(ours, base), "## Family means (Figure 2)"]
        if comparison is None:
            parts.append("| Family | Top-1 | Top-5 |\n|---|---:|---:|\n" + "\n".join(
                f"| {fam} | {_f(v['top1'])} | {_f(v['top5'])} |" for fam, v in ours["families"].items()))
        else:
            head = "| Family | Ours@1 | Base@1 | Δ@1 | Ours@5 | Base@5 | Δ@5 |\n|---|---:|---:|---:|---:|---:|---:|\n"
            cells = lambda v: " | ".join(_f(v.get(m, {}).get(k), k == "delta")  # noqa: E731
                                         for m in ("top1", "top5") for k in ("ours", "base", "delta"))
            parts.append(head + "\n".join(f"| {fam} | {cells(v)} |" for fam, v in comparison["families"].items()))
            parts.append(f"Ours vs base: {comparison['summary']}.")
    if ours["retrieval"]:
        parts += ["## Retrieval (Table 2)", table2(ours, base)]
    if ours.get("synthetic"):
        parts += ["## Synthetic world (CPU demo)", synthetic_table(ours, base)]
    nights = ours.get("nights")
    if nights and "skipped" in nights:
        parts += ["## NIGHTS 2AFC", f"skipped: {nights['skipped']} ({nights['path']})"]
    elif nights and comparison and comparison.get("nights"):
        parts += ["## NIGHTS 2AFC", "| Split | n | Ours | Base | Δ |\n|---|---:|---:|---:|---:|\n" + "\n".join(
            f"| {s} | {nights[s]['n']} | {_f(v['ours'])} | {_f(v['base'])} | {_f(v['delta'], True)} |"
            for s, v in comparison["nights"].items())]
    elif nights:
        parts += ["## NIGHTS 2AFC", "| Split | 2AFC | n |\n|---|---:|---:|\n" + "\n".join(
            f"| {s} | {_f(v.get('2afc'))} | {v.get('n', 'skipped: ' + v.get('skipped', ''))} |"
            for s, v in nights.items())]
    if ours.get("probes"):
        parts += ["## Perceptual probes", "```json\n" + json.dumps(ours["probes"], indent=1) + "\n```"]
    gone = [(BENCHMARKS[n].title, r) for n, r in ours["zeroshot"].items() if "skipped" in r]
    gone += [(RETRIEVAL[n][0], r) for n, r in ours["retrieval"].items() if "skipped" in r]
    if gone:
        parts += ["## Skipped (files not found)", "\n".join(f"- {t}: {r['skipped']} ({r['path']})" for t, r in gone)]
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


def write_scaling(rows, out_dir):
    """scaling.csv (one row per run and checkpoint), scaling_fit.json (a, β per run and curve) and scaling.png
    (Figures 3-4: log-log, every run on the same axes) when matplotlib, a dev requirement, is installed."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out_dir, "scaling.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    curves = [c for c in cols if c not in ("run", "epoch", "samples_seen", "checkpoint")]
    runs = list(dict.fromkeys(r.get("run", "") for r in rows))
    fits, drawn = {}, []
    for c in curves:
        for run in runs:  # keys: the curve's name for one run, "<run>: <curve>" for several
            pts = [(r["samples_seen"], r[c]) for r in rows if r.get("run", "") == run and r.get(c) is not None]
            fits[c if len(runs) == 1 else f"{run}: {c}"] = fit = fit_power_law(*zip(*pts)) if pts else None
            if fit and (c.endswith("top1") or c.endswith("_r1")) and c not in drawn:  # the paper's panels
                drawn.append(c)
    with open(os.path.join(out_dir, "scaling_fit.json"), "w") as f:
        json.dump(fits, f, indent=1)
    try:
        import plots  # matplotlib is for figures only: without it the CSV and the fits still come out
    except ImportError as e:
        print(f"no scaling.png ({e}); pip install -r requirements-dev.txt to draw it")
        return fits
    if drawn:
        plots.plot_scaling(rows, os.path.join(out_dir, "scaling.png"), curves=drawn)
    return fits

# -----------------------------------------------------------------------------------------------------------------
# 10. Command line

PRESETS = {"ViT-B-32": CLIPConfig, "ViT-B-32-quickgelu": lambda: CLIPConfig(quick_gelu=True), "tiny": CLIPConfig.tiny}


def config_from_dict(d):
    """A CLIPConfig from a dict that may hold other things too (a run's config.json): its CLIPConfig fields, on
    top of the preset named by a "model" entry if it names one."""
    base = PRESETS[d["model"]]() if isinstance(d.get("model"), str) and d["model"] in PRESETS else CLIPConfig()
    known = {f.name for f in fields(CLIPConfig)}
    return CLIPConfig(**{**asdict(base), **{k: v for k, v in d.items() if k in known}})


def load_model(checkpoint, preset=None, config_json=None, device="cpu"):
    """CLIP with a checkpoint's weights. The architecture comes from, most explicit first: --config-json, --model,
    a "config" entry saved in the checkpoint, config.json beside it, else ViT-B/32."""
    sd = load_checkpoint(checkpoint)
    beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
    if config_json:
        with open(config_json) as f:
            cfg = config_from_dict(json.load(f))
    elif preset:
        cfg = PRESETS[preset]()
    elif isinstance(sd.get("config"), dict):
        cfg = config_from_dict(sd["config"])
    elif os.path.exists(beside):
        with open(beside) as f:
            cfg = config_from_dict(json.load(f))
    else:
        cfg = CLIPConfig()
    model = CLIP(cfg)
    load_state_dict_checked(model, sd, what=checkpoint)
    return model.to(device).eval()


def fingerprint(path, *extra):
    """Identifies a checkpoint file's contents cheaply (path, size, mtime) for the classifier cache."""
    st = os.stat(path)
    key = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, *extra])
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="plain state dict (torch.save(model.state_dict())) of the model to evaluate")
    p.add_argument("--model", choices=list(PRESETS),
                   help="architecture preset (default: from the checkpoint, else ViT-B-32)")
    p.add_argument("--config-json", help="CLIPConfig fields as JSON (e.g. a learned tokenizer's vocab_size)")
    p.add_argument("--merges", help="BPE merges file (bpe_simple_vocab_16e6.txt.gz format) the model was trained with")
    p.add_argument("--data-root", default="data",
                   help="one folder per dataset, see the layout in this file's docstring")
    p.add_argument("--datasets", default="all", help=f"'all' or a comma list of: {', '.join(BENCHMARKS)}")
    p.add_argument("--retrieval", default="flickr30k,coco", help="comma list of: flickr30k, coco ('' for none)")
    p.add_argument("--nights", help="NIGHTS root (data.csv, ref/, distort/) for 2AFC on val / test splits")
    p.add_argument("--probes", default="", help=f"'all' or a comma list of: {', '.join(PROBES)}")
    p.add_argument("--synthetic", help="root of a synthetic_world.py world (demo): its zero-shot tasks, retrieval "
                                       "and, unless --nights is given, its NIGHTS stand-in")
    p.add_argument("--out", default="results", help="folder for results.json, report.md, scaling.csv")
    p.add_argument("--compare", help="base model: a checkpoint (evaluated the same way) or an earlier results.json")
    p.add_argument("--scaling", help="run folder(s), comma-separated, with per-epoch checkpoints (epoch_N.pt): "
                                     "Figures 3-4")
    p.add_argument("--samples-per-epoch", type=int, help="training pairs per epoch (with --scaling)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--download", action="store_true", help="let torchvision download the sets it can")
    p.add_argument("--no-cache", action="store_true", help="do not keep text classifiers in <out>/cache")
    args = p.parse_args(argv)

    datasets = parse_names(args.datasets, list(BENCHMARKS), "dataset")
    retrieval = parse_names(args.retrieval, list(RETRIEVAL), "retrieval benchmark")
    probes = parse_names(args.probes, list(PROBES), "probe")
    if not args.checkpoint and not args.scaling:
        p.error("give --checkpoint (and/or --scaling RUN_DIR)")
    if args.scaling and not args.samples_per_epoch:
        p.error("--scaling needs --samples-per-epoch (training pairs per epoch) to place checkpoints on the x axis")
    if args.synthetic and not args.nights:
        args.nights = os.path.join(args.synthetic, "nights")
    os.makedirs(args.out, exist_ok=True)
    tokenizer = data.Tokenizer(args.merges)
    cache_dir = None if args.no_cache else os.path.join(args.out, "cache")

    def run(checkpoint, what):
        print(f"== {what}: {checkpoint}")
        model = load_model(checkpoint, args.model, args.config_json, args.device)
        tag = fingerprint(checkpoint, os.path.abspath(args.merges) if args.merges else None, model.config.image_size)
        res = evaluate(model, tokenizer, args.data_root, datasets, retrieval, args.nights, probes, args.synthetic,
                       args.batch_size, args.workers, cache_dir, tag, args.download)
        return {"checkpoint": os.path.abspath(checkpoint), "config": asdict(model.config), **res}

    if args.checkpoint:
        ours = run(args.checkpoint, "ours")
        base = comparison = None
        if args.compare:
            if args.compare.endswith(".json"):
                with open(args.compare) as f:
                    base = json.load(f)
                base = base.get("ours", base)
            else:
                base = run(args.compare, "base")
            comparison = compare(ours, base)
        out = {"ours": ours, "base": base, "comparison": comparison}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(out, f, indent=1)
        md = report_markdown(ours, base, comparison)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(md)
        print(md)
        if comparison and ours["zeroshot"]:
            print(comparison["summary"])
    if args.scaling:
        rows = []
        for run_dir in args.scaling.split(","):  # several runs (PI, baseline) share the figure's axes
            for epoch, path in run_checkpoints(run_dir):
                res = run(path, f"{run_dir} epoch {epoch}")
                rows.append({"run": os.path.basename(os.path.normpath(run_dir)),
                             **scaling_rows(res, epoch, epoch * args.samples_per_epoch, path)})
        fits = write_scaling(rows, args.out)
        print("power-law exponents β:", json.dumps({k: (v or {}).get("beta") for k, v in fits.items()}, indent=1))


if __name__ == "__main__":
    main()
