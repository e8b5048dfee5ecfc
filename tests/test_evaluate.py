"""evaluate.py: metrics against hand-computed values, the zero-shot classifier against a direct computation and
against open_clip holding the same weights, and the CLI end to end on tiny fake datasets (no network)."""
import csv
import io
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import evaluate as ev
import synthetic_world
from model import CLIP, CLIPConfig

# -----------------------------------------------------------------------------------------------------------------
# metrics


def test_topk_accuracy_ties_and_k_beyond_classes():
    logits = torch.tensor([[3.0, 1.0, 2.0],   # target 0 is the clear winner
                           [1.0, 1.0, 1.0],   # target 2 tied with all three: top-1 1/3, top-2 2/3
                           [0.0, 5.0, 5.0],   # target 1 tied with class 2 for first: top-1 1/2, top-2 1
                           [9.0, 5.0, 1.0]])  # target 2 last: top-1 0, top-2 0, top-3 1
    targets = torch.tensor([0, 2, 1, 2])
    assert ev.topk_accuracy(logits, targets, 1) == pytest.approx((1 + 1 / 3 + 1 / 2 + 0) / 4)
    assert ev.topk_accuracy(logits, targets, 2) == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert ev.topk_accuracy(logits, targets, 3) == pytest.approx(1.0)
    assert ev.topk_accuracy(logits, targets, 5) == pytest.approx(1.0)  # k > #classes


def test_topk_accuracy_without_ties_is_the_usual_definition():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(200, 10, generator=g), torch.randint(0, 10, (200,), generator=g)
    for k in (1, 3, 5):
        usual = (logits.topk(k, dim=1).indices == targets[:, None]).any(1).float().mean().item()
        assert ev.topk_accuracy(logits, targets, k) == pytest.approx(usual)


def _recall_by_loops(scores, positives, k):
    """Independent reference: sort each query's candidates, count a hit if any positive is in the first k."""
    hits = 0
    for s, pos in zip(scores.tolist(), positives.tolist()):
        order = sorted(range(len(s)), key=lambda j: -s[j])[:k]
        hits += any(pos[j] for j in order)
    return hits / len(scores)


def test_recall_at_k_five_captions_per_image():
    # 2 images, 5 captions each (captions 0-4 describe image 0, 5-9 image 1); scores[text, image]
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.4], [0.6, 0.5], [0.1, 0.2],
                           [0.0, 0.7], [0.5, 0.4], [0.35, 0.3], [0.2, 0.9], [0.05, 0.95]])
    text_to_image = [0] * 5 + [1] * 5
    r = ev.retrieval_metrics(torch.eye(2), F.normalize(torch.randn(10, 2), dim=-1), text_to_image)  # shape check only
    assert set(r) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    pos = torch.zeros(10, 2, dtype=torch.bool)
    pos[torch.arange(10), torch.tensor(text_to_image)] = True
    # T->I R@1: captions 0, 3 of image 0 and 5, 8, 9 of image 1 rank their image first -> 5/10
    assert ev.recall_at_k(scores, pos, 1) == pytest.approx(0.5)
    assert ev.recall_at_k(scores, pos, 2) == pytest.approx(1.0)  # only 2 images: k clipped
    # I->T R@1: image 0's best caption is 0 (0.9, its own) -> hit; image 1's best is 9 (0.95, its own) -> hit
    assert ev.recall_at_k(scores.t(), pos.t(), 1) == pytest.approx(1.0)
    # a harder case where image 0's best captions belong to image 1 until rank 3
    s2 = scores.t().clone()
    s2[0, 5:] = torch.tensor([0.99, 0.98, 0.1, 0.1, 0.1])
    assert ev.recall_at_k(s2, pos.t(), 1) == pytest.approx(0.5)
    assert ev.recall_at_k(s2, pos.t(), 2) == pytest.approx(0.5)
    assert ev.recall_at_k(s2, pos.t(), 3) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(50, 10, generator=g)
    p = torch.zeros(50, 10, dtype=torch.bool)
    p[torch.arange(50), torch.arange(50) // 5] = True
    for k in (1, 5, 10):
        assert ev.recall_at_k(s, p, k) == pytest.approx(_recall_by_loops(s, p, k))
        assert ev.recall_at_k(s.t(), p.t(), k) == pytest.approx(_recall_by_loops(s.t(), p.t(), k))


def test_recall_matches_clip_benchmark():
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    g = torch.Generator().manual_seed(2)
    image_emb = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    text_emb = F.normalize(torch.randn(100, 8, generator=g), dim=-1)
    t2i = torch.arange(100) // 5
    ours = ev.retrieval_metrics(image_emb, text_emb, t2i, ks=(1, 5, 10))
    scores = text_emb @ image_emb.t()
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[torch.arange(100), t2i] = True
    for k in (1, 5, 10):  # clip_benchmark: image_retrieval = text queries, text_retrieval = image queries
        ref_t2i = (zr.batchify(zr.recall_at_k, scores, pos, 64, "cpu", k=k) > 0).float().mean().item()
        ref_i2t = (zr.batchify(zr.recall_at_k, scores.T, pos.T, 64, "cpu", k=k) > 0).float().mean().item()
        assert ours[f"t2i_r{k}"] == pytest.approx(100 * ref_t2i)
        assert ours[f"i2t_r{k}"] == pytest.approx(100 * ref_i2t)


def test_pearson_spearman_known_values():
    assert ev.pearson([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert ev.spearman([1, 2, 3, 4, 5], [50, 40, 30, 20, 10]) == pytest.approx(-1.0)
    assert ev.pearson([1, 2, 3, 4, 5], [1, 3, 2, 5, 4]) == pytest.approx(0.8)  # 8 / sqrt(10 * 10)
    assert ev.spearman([1, 2, 3, 4, 5], [1, 9, 4, 100, 25]) == pytest.approx(0.8)  # same ranks as above
    # ties take their average rank: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5)
    assert ev.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert list(ev.rankdata([10, 30, 20, 20])) == [1.0, 4.0, 2.5, 2.5]


def test_pearson_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=300), rng.integers(0, 7, size=300)  # many ties in y
    y = y + 0.5 * x
    assert ev.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert ev.spearman(x, np.round(y)) == pytest.approx(stats.spearmanr(x, np.round(y))[0])


def test_power_law_fit_recovers_beta():
    n = np.geomspace(1e7, 3e8, 12)
    fit = ev.fit_power_law(n, 0.03 * n ** 0.17)
    assert fit["beta"] == pytest.approx(0.17, abs=1e-9) and fit["a"] == pytest.approx(0.03, rel=1e-6)
    noisy = 0.03 * n ** 0.17 * np.exp(np.random.default_rng(0).normal(0, 0.01, len(n)))
    assert ev.fit_power_law(n, noisy)["beta"] == pytest.approx(0.17, abs=0.02)
    # a zero accuracy (an untrained first checkpoint) has no logarithm and is left out
    fit = ev.fit_power_law([1e6, *n], [0.0, *(2.0 * n ** -0.1)])
    assert fit["points"] == 12 and fit["beta"] == pytest.approx(-0.1)
    assert ev.fit_power_law([1e6], [0.5]) is None

# -----------------------------------------------------------------------------------------------------------------
# the paper's own numbers through compare() and the tables

PAPER_TOP1 = {  # Table 1: (ours, base) top-1 and top-5 (None where the paper has none)
    "imagenet1k": (18.9, 15.1, 39.0, 33.3), "imagenet-a": (5.3, 4.0, 19.0, 16.0),
    "imagenet-o": (21.6, 14.3, 46.2, 31.9),
    "imagenet-r": (15.0, 10.3, 34.7, 24.6), "imagenet_sketch": (4.1, 3.0, 11.7, 9.1),
    "imagenetv2": (13.1, 8.3, 30.6, 20.0), "objectnet": (7.3, 5.5, 20.5, 17.8), "cifar100": (35.9, 33.0, 67.5, 64.9),
    "caltech101": (44.7, 47.9, 82.7, 80.9), "clevr_closest_object_distance": (15.8, 16.1, 90.7, 91.0),
    "clevr_count_all": (16.1, 11.5, 61.8, 65.3), "kitti_closest_vehicle_distance": (32.1, 31.5, None, None),
    "dtd": (14.3, 10.4, 34.4, 28.0), "eurosat": (24.7, 19.6, 76.2, 69.0), "flowers": (26.7, 18.7, 52.3, 40.9),
    "pets": (17.2, 11.6, 38.8, 29.1), "resisc45": (17.6, 15.9, 45.2, 37.1), "svhn": (11.0, 11.3, 61.0, 54.5),
    "pcam": (50.5, 50.8, None, None), "cars": (1.7, 1.5, 6.9, 6.9), "food101": (12.1, 8.3, 35.8, 26.0),
    "fgvc_aircraft": (1.6, 1.7, 6.5, 5.7), "voc2007": (46.6, 38.4, 74.8, 73.3), "cifar10": (69.5, 62.4, 95.9, 95.7),
    "country211": (3.5, 3.0, 11.3, 10.4), "gtsrb": (7.0, 5.9, 35.0, 32.8), "mnist": (12.4, 11.6, 55.1, 55.0),
    "renderedsst2": (49.9, 49.9, None, None), "stl10": (73.2, 58.6, 98.0, 96.8),
}


def _paper_results(which):
    z = {}
    for n, (o1, b1, o5, b5) in PAPER_TOP1.items():
        b = ev.BENCHMARKS[n]
        z[n] = {"top1": o1 if which == "ours" else b1, "top5": o5 if which == "ours" else b5, "n": b.n_test,
                "n_classes": b.n_classes}
    return {"zeroshot": z, "retrieval": {}, "families": {}}


def test_compare_reproduces_the_papers_count_and_family_means():
    c = ev.compare(_paper_results("ours"), _paper_results("base"))
    assert c["top1_count"] == {"win": 23, "tie": 1, "loss": 5}  # "23 of 29 (with 1 tie and 5 losses)", §4.1
    assert "23 of 29" in c["summary"]
    fam = {f: round(v["top1"]["delta"], 1) for f, v in c["families"].items()}  # Figure 2a
    assert fam == {"ImageNet": 3.8, "ImageNet OOD": 3.5, "VTAB": 2.4, "Fine-grained & Specialty": 3.0,
                   "Misc. / Domain & Small": 4.0}
    assert round(c["families"]["ImageNet OOD"]["top5"]["delta"], 1) == 7.2  # Figure 2b
    assert c["datasets"]["caltech101"]["top1"]["delta"] == pytest.approx(-3.2)
    assert "top5" not in c["datasets"]["pcam"]
    # unrounded accuracies: a Δ under 0.05 pp shows as +0.0 in the table and counts as a tie, not a win
    ours, base = _paper_results("ours"), _paper_results("base")
    ours["zeroshot"]["mnist"]["top1"] = base["zeroshot"]["mnist"]["top1"] + 0.04
    ours["zeroshot"]["gtsrb"]["top1"] = base["zeroshot"]["gtsrb"]["top1"] - 0.06
    assert ev.compare(ours, base)["top1_count"] == {"win": 21, "tie": 2, "loss": 6}


def test_table1_layout_with_compare():
    md = ev.table1(_paper_results("ours"), _paper_results("base"))
    lines = md.splitlines()
    assert lines[0] == "| Dataset | Task | #Test | #Cls | Ours@1 | Base@1 | Δ@1 | Ours@5 | Base@5 | Δ@5 |"
    assert "| CIFAR-10 | Visual recog. | 10000 | 10 | 69.5 | 62.4 | +7.1 | 95.9 | 95.7 | +0.2 |" in lines
    assert "| PCAM | Histopath. cls. | 32768 | 2 | 50.5 | 50.8 | -0.3 | — | — | — |" in lines
    fam_rows = [i for i, line in enumerate(lines) if line.startswith("| **")]
    assert [lines[i].split("**")[1] for i in fam_rows] == ev.FAMILIES
    assert len(lines) == 2 + 5 + 29


def test_unknown_dataset_fails_at_once_listing_known(tmp_path):
    with pytest.raises(SystemExit) as e:
        ev.main(["--checkpoint", str(tmp_path / "never_read.pt"), "--datasets", "cifar10,imagenet",
                 "--out", str(tmp_path)])
    msg = str(e.value)
    assert "imagenet" in msg.split("Known")[0] and "imagenet1k" in msg and "stl10" in msg


def test_prompts_file_covers_the_29_datasets():
    p = ev.prompts()
    assert "clip_benchmark" in p["_source"] and set(ev.BENCHMARKS) == {k for k in p if not k.startswith("_")}
    for name, b in ev.BENCHMARKS.items():
        assert p[name]["templates"] and all("{c}" in t for t in p[name]["templates"])
        if p[name]["classes"] is not None:
            assert len(p[name]["classes"]) == b.n_classes, name
        else:
            assert p[name]["classes_from"], name
    assert len(p["_imagenet1k_wnids"]) == 1000 and len(p["imagenet1k"]["templates"]) == 80

def _touch(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_readers_label_the_non_torchvision_layouts(tmp_path):
    tf = lambda x: x  # noqa: E731  (readers are checked on their item lists; no image is opened)
    # CLEVR: VTAB's count (objects - 3) and closest-object-distance bins (8, 8.5, 9, 9.5, 10)
    scenes = {"scenes": [{"image_filename": f"CLEVR_val_00000{i}.png",
                          "objects": [{"pixel_coords": [1, 2, z]} for z in zs]}
                         for i, zs in enumerate([[12.0, 8.2, 9.9], [7.5, 11, 11, 11, 11], [9.2, 10.5, 9.7, 9.6]])]}
    _touch(str(tmp_path / "clevr/CLEVR_v1.0/scenes/CLEVR_val_scenes.json"), json.dumps(scenes))
    ds, classes, _ = ev.build_dataset("clevr_count_all", str(tmp_path / "clevr"), tf)
    assert [y for _, y in ds.items] == [0, 2, 1] and classes[0] == "three"
    ds, classes, _ = ev.build_dataset("clevr_closest_object_distance", str(tmp_path / "clevr"), tf)
    assert [y for _, y in ds.items] == [1, 0, 3] and len(classes) == 6
    # KITTI: nearest Car/Van/Truck under 8 m, under 20 m, further, or none
    k = tmp_path / "kitti/training/label_2"
    rows = {"000000": ["Car 0 0 0 1 2 3 4 1.5 1.6 3.9 1.0 1.5 5.0 0.1", "Pedestrian 0 0 0 1 2 3 4 1 1 1 0 0 2.0 0"],
            "000001": ["Van 0 0 0 1 2 3 4 1 1 1 0 0 15.0 0", "Truck 0 0 0 1 2 3 4 1 1 1 0 0 30.0 0"],
            "000002": ["Truck 0 0 0 1 2 3 4 1 1 1 0 0 45.0 0"], "000003": ["Cyclist 0 0 0 1 2 3 4 1 1 1 0 0 3.0 0"]}
    for i, r in rows.items():
        _touch(str(k / f"{i}.txt"), "\n".join(r) + "\n")
    ds, _, info = ev.build_dataset("kitti_closest_vehicle_distance", str(tmp_path / "kitti"), tf)
    assert [y for _, y in ds.items] == [0, 1, 2, 3] and "not VTAB" in info["split"]
    _touch(str(tmp_path / "kitti/test_ids.txt"), "000002\n000001\n")
    ds, _, info = ev.build_dataset("kitti_closest_vehicle_distance", str(tmp_path / "kitti"), tf)
    assert [y for _, y in ds.items] == [2, 1] and "test_ids" in info["split"]
    # VOC 2007: one crop per annotated object of the test images
    v = tmp_path / "voc2007/VOCdevkit/VOC2007"
    _touch(str(v / "ImageSets/Main/test.txt"), "000001\n")
    obj = ("<object><name>{}</name><difficult>{}</difficult>"
           "<bndbox><xmin>{}</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>")
    _touch(str(v / "Annotations/000001.xml"),
           "<annotation>" + obj.format("dog", 0, 1) + obj.format("tvmonitor", 1, 5) + "</annotation>")
    ds, classes, _ = ev.build_dataset("voc2007", str(tmp_path / "voc2007"), tf)
    assert [(y, box) for _, y, box in ds.items] == [(classes.index("dog"), [1, 2, 30, 40]), (19, [5, 2, 30, 40])]
    # Caltech-101: 102 folders in case-sensitive order; the first 30 images of a class are VTAB's train share
    cal = tmp_path / "caltech101/101_ObjectCategories"
    for d, n in (("BACKGROUND_Google", 31), ("Faces", 32), ("accordion", 30)):
        for i in range(n):
            _touch(str(cal / f"{d}/image_{i:04d}.jpg"))
    for i in range(98):  # the other classes, after these in case-sensitive order
        (cal / f"z_{i:02d}").mkdir()
    with pytest.raises(ValueError, match="has 101 class folders, Caltech-101 102"):  # a partial copy: labels would shift
        ev.build_dataset("caltech101", str(tmp_path / "caltech101"), tf)
    (cal / "z_98").mkdir()
    ds, classes, _ = ev.build_dataset("caltech101", str(tmp_path / "caltech101"), tf)
    assert [(os.path.basename(p), y) for p, y in ds.items] == [("image_0030.jpg", 0), ("image_0030.jpg", 1),
                                                                ("image_0031.jpg", 1)]
    assert classes[:3] == ["background", "off-center face", "centered face"]
    # ImageNet-V2: folders are class indices, not ImageFolder's lexicographic order
    for d in ("0", "10", "2"):
        _touch(str(tmp_path / f"imagenetv2/{d}/a.jpeg"))
    ds, classes, _ = ev.build_dataset("imagenetv2", str(tmp_path / "imagenetv2"), tf)
    assert [y for _, y in ds.items] == [0, 10, 2] and len(classes) == 1000
    # ObjectNet: only the folders whose label maps onto ImageNet, named by their lower-cased label
    o = tmp_path / "objectnet/objectnet-1.0"
    _touch(str(o / "mappings/folder_to_objectnet_label.json"),
           json.dumps({"air_freshener": "Air freshener", "alarm_clock": "Alarm clock", "zz": "Not in ImageNet"}))
    _touch(str(o / "mappings/objectnet_to_imagenet_1k.json"),
           json.dumps({"Alarm clock": "analog clock", "Air freshener": "x"}))
    for d in ("air_freshener", "alarm_clock", "zz"):
        _touch(str(o / f"images/{d}/1.png"))
    ds, classes, _ = ev.build_dataset("objectnet", str(tmp_path / "objectnet"), tf)
    assert classes == ["air freshener", "alarm clock"] and [y for _, y in ds.items] == [0, 1]


# -----------------------------------------------------------------------------------------------------------------
# the zero-shot classifier and the model


class CharTokenizer:
    """A stand-in tokenizer for unit tests: [SOT] + bytes + [EOT], padded to the context length (the EOT has the
    highest id)."""

    def __init__(self, vocab_size=49408, context_length=77):
        self.sot, self.eot, self.context_length = vocab_size - 2, vocab_size - 1, context_length

    def __call__(self, texts, context_length=None):
        context_length = context_length or self.context_length
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot] + [b + 1 for b in t.encode()[:context_length - 2]] + [self.eot]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def tiny_model(seed=0, **cfg):
    torch.manual_seed(seed)
    return CLIP(CLIPConfig.tiny(**cfg)).eval()


def test_zero_shot_classifier_equals_direct_computation():
    model, tok = tiny_model(), CharTokenizer()
    classes, templates = ["cat", "dog", "traffic light"], ["a photo of a {c}.", "a drawing of the {c}", "{c}!"]
    clf = ev.zero_shot_classifier(model, tok, classes, templates, torch.device("cpu"), batch_size=4)
    direct = []
    with torch.no_grad():
        for c in classes:
            e = model.encode_text(tok([t.format(c=c) for t in templates], context_length=model.context_length))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            direct.append(m / m.norm())
    assert clf.shape == (32, 3)
    torch.testing.assert_close(clf, torch.stack(direct, 1), atol=1e-5, rtol=1e-5)
    # "{}" templates (synthetic_world.synthetic_zeroshot_tasks) fill in the same way as clip_benchmark's "{c}"
    plain = ev.zero_shot_classifier(model, tok, classes, [t.replace("{c}", "{}") for t in templates],
                                    torch.device("cpu"))
    torch.testing.assert_close(plain, clf)


def _write_images(folder, n, seed, size=40):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 255, 3)  # a colour per image plus noise, so images differ
        arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img{i}.png"))


WNIDS = ["n01498041", "n01531178", "n01534433"]  # three ImageNet-A classes


def _imagenet_a(root, per_class=3):
    for j, w in enumerate(WNIDS):
        _write_images(os.path.join(root, "imagenet-a", w), per_class, seed=j)
    return os.path.join(root, "imagenet-a")


def test_zero_shot_eval_same_accuracy_as_open_clip_with_same_weights(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    ours = tiny_model(seed=3)
    cfg = ours.config
    oc = open_clip.model.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                        layers=cfg.vision_layers, head_width=cfg.vision_width // cfg.vision_heads),
        text_cfg=dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                      heads=cfg.text_heads, layers=cfg.text_layers)).eval()
    oc.load_state_dict(ours.state_dict(), strict=True)
    root = _imagenet_a(tmp_path, per_class=4)
    tok, tf = CharTokenizer(), data.eval_transform(cfg.image_size)
    r_ours = ev.zero_shot_eval(ours, tok, "imagenet-a", root, workers=0, batch_size=5)
    r_oc = ev.zero_shot_eval(oc, tok, "imagenet-a", root, transform=tf, workers=0, batch_size=5)
    # reference: open_clip's model, written out by hand (images one by one, classifier per class); all 200 of
    # ImageNet-A's classes are candidates, whichever folders are there (WNIDS are its first three)
    names, all_wnids = ev.imagenet_names(), ev.set_wnids("imagenet-a")
    templates = ev.prompts()["imagenet-a"]["templates"]
    assert all_wnids[:3] == WNIDS and len(all_wnids) == 200
    with torch.no_grad():
        clf = torch.stack([F.normalize(F.normalize(oc.encode_text(tok([t.format(c=names[w]) for t in templates],
                                                                       context_length=oc.context_length)),
                                                   dim=-1).mean(0), dim=0) for w in all_wnids], 1)
        logits, labels = [], []
        for j, w in enumerate(WNIDS):
            for f in sorted(os.listdir(os.path.join(root, w))):
                img = tf(Image.open(os.path.join(root, w, f)).convert("RGB"))[None]
                logits.append(100 * F.normalize(oc.encode_image(img), dim=-1) @ clf)
                labels.append(j)
    logits, labels = torch.cat(logits), torch.tensor(labels)
    ref_top1 = 100 * (logits.argmax(1) == labels).float().mean().item()
    ref_top5 = 100 * (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert r_ours["n"] == r_oc["n"] == 12 and r_ours["n_classes"] == 200 and r_ours["n_classes_with_images"] == 3
    assert r_ours["top1"] == pytest.approx(ref_top1) and r_oc["top1"] == pytest.approx(ref_top1)
    assert r_ours["top5"] == pytest.approx(ref_top5) and r_oc["top5"] == pytest.approx(ref_top5)
    # the two models agree on the features, not just on the accuracy
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), oc.encode_image(x), atol=1e-5, rtol=1e-4)


def test_nights_eval_matches_direct_two_afc(monkeypatch):
    from model import two_afc_accuracy

    class FakeNights(torch.utils.data.Dataset):  # the interface of data.NightsTriplets
        def __init__(self, root, split, image_size=224):
            g = torch.Generator().manual_seed(len(split))
            self.x = torch.randn(7, 3, 3, 32, 32, generator=g)
            self.y = (torch.arange(7) % 2).float()

        def __len__(self):
            return 7

        def __getitem__(self, i):
            return self.x[i, 0], self.x[i, 1], self.x[i, 2], self.y[i]

    monkeypatch.setattr(data, "NightsTriplets", FakeNights, raising=False)
    model = tiny_model().train()  # as train_clip.py / train_nights.py would hand it over mid-training
    out = ev.nights_eval(model, "unused", workers=0, batch_size=3)
    assert model.training  # put back as it was
    for split in ev.NIGHTS_EVAL_SPLITS:
        ds = FakeNights(None, split)
        with torch.no_grad():
            f = [model.encode_image(ds.x[:, j]) for j in range(3)]
        assert out[split]["2afc"] == pytest.approx(100 * float(two_afc_accuracy(*f, ds.y)))
        assert out[split]["n"] == 7
    assert out["test"]["2afc"] == pytest.approx((out["test_imagenet"]["2afc"] + out["test_no_imagenet"]["2afc"]) / 2)

# -----------------------------------------------------------------------------------------------------------------
# the perceptual and robustness probes (TID2013, Geirhos et al.'s cue-conflict, CIFAR-100-C) on tiny fake folders


def test_tid2013_correlations_match_direct(tmp_path):
    root = tmp_path / "tid2013"
    _write_images(root / "reference_images", 2, seed=5)
    os.rename(root / "reference_images" / "img0.png", root / "reference_images" / "I01.BMP")
    os.rename(root / "reference_images" / "img1.png", root / "reference_images" / "I02.BMP")
    _write_images(root / "distorted_images", 6, seed=6)
    names = [f"i0{r}_0{d}_1.bmp" for r in (1, 2) for d in (1, 2, 3)]
    for i, n in enumerate(names):
        os.rename(root / "distorted_images" / f"img{i}.png", root / "distorted_images" / n)
    mos = [5.1, 3.2, 4.4, 6.0, 1.5, 2.5]
    (root / "mos_with_names.txt").write_text("".join(f"{m} {n}\n" for m, n in zip(mos, names)))
    model = tiny_model()
    out = ev.tid2013_eval(model, str(root), workers=0)
    tf = data.eval_transform(32)

    def emb(p):
        with torch.no_grad():
            return F.normalize(model.encode_image(tf(Image.open(p).convert("RGB"))[None]), dim=-1)[0]
    sims = [float(emb(root / "reference_images" / f"I0{n[2]}.BMP") @ emb(root / "distorted_images" / n)) for n in names]
    assert out["n"] == 6
    assert out["pearson"] == pytest.approx(float(np.corrcoef(sims, mos)[0, 1]), abs=1e-5)
    assert out["spearman"] == pytest.approx(ev.pearson(ev.rankdata(sims), ev.rankdata(mos)), abs=1e-5)


def test_cue_conflict_bias_counts(tmp_path, monkeypatch):
    root = tmp_path / "cue-conflict"
    files = {"cat": ["cat1-dog2.png", "cat2-car1.png", "cat3-cat1.png"], "dog": ["dog1-cat3.png"],
             "car": ["car1-dog1.png"]}
    for shape, fs in files.items():
        _write_images(root / shape, len(fs), seed=len(shape))
        for i, f in enumerate(fs):
            os.rename(root / shape / f"img{i}.png", root / shape / f)
    # a model stub whose image embedding is one-hot on a chosen class: the texture for the first two images, the
    # shape for the rest; classes are sorted folder names: car, cat, dog

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = CLIPConfig.tiny()

        def encode_image(self, x):  # all four images come in one batch
            return self.picks[:len(x)].float()

    monkeypatch.setattr(ev, "zero_shot_classifier", lambda *a, **k: torch.eye(3))
    stub = Stub()
    # items in order: car/car1-dog1 (shape car=0, texture dog=2), cat/cat1-dog2 (cat=1, dog=2), cat/cat2-car1 (1, 0),
    # dog/dog1-cat3 (2, 1); cat3-cat1 is left out (shape == texture)
    stub.picks = F.one_hot(torch.tensor([2, 2, 1, 2]), 3)  # texture, texture, shape, shape
    out = ev.cue_conflict_eval(stub, None, str(root), workers=0)
    assert out["n"] == 4
    assert out["texture_bias"] == pytest.approx(2 / 4) and out["shape_bias"] == pytest.approx(2 / 4)
    stub.picks = F.one_hot(torch.tensor([2, 2, 0, 1]), 3)  # texture, texture, texture, texture
    out = ev.cue_conflict_eval(stub, None, str(root), workers=0)
    assert out["texture_bias"] == pytest.approx(1.0) and out["shape_bias"] == pytest.approx(0.0)


def test_probes_without_their_files_are_skipped(tmp_path):
    (tmp_path / "cue-conflict" / "cat").mkdir(parents=True)  # there, but without cue-conflict images
    res = {"zeroshot": {}}
    out = {p: ev.run_probe(p, tiny_model(), CharTokenizer(), str(tmp_path), res, {"workers": 0}) for p in ev.PROBES}
    assert out["tid2013"]["skipped"] == "missing"
    assert str(tmp_path / "tid2013" / "mos_with_names.txt") in out["tid2013"]["path"]
    assert out["noise"]["skipped"] == "missing" and "gaussian_noise.npy" in out["noise"]["path"]
    assert out["cue_conflict"]["skipped"].startswith("no <shape>")


def test_noise_sensitivity_relative_drop(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "CIFAR-100-C"
    root.mkdir()
    np.save(root / "gaussian_noise.npy", rng.integers(0, 255, (5 * 4, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(np.array([0, 1, 2, 1]), 5))
    monkeypatch.setattr(ev, "cifar100_classes", lambda root: ["apple", "bee", "cloud"])
    model, tok = tiny_model(), CharTokenizer()
    out = ev.noise_sensitivity_eval(model, tok, str(root), "unused", workers=0, clean_top1=50.0)
    clf = ev.zero_shot_classifier(model, tok, ["apple", "bee", "cloud"], ev.prompts()["cifar100"]["templates"],
                                  torch.device("cpu"))
    images, labels = np.load(root / "gaussian_noise.npy"), torch.tensor(np.load(root / "labels.npy"))
    tf = data.eval_transform(32)
    with torch.no_grad():
        feats = F.normalize(model.encode_image(torch.stack([tf(Image.fromarray(a)) for a in images])), dim=-1)
    acc = [100 * ((feats[s:s + 4] @ clf).argmax(1) == labels[s:s + 4]).float().mean().item() for s in range(0, 20, 4)]
    assert out["noisy_top1"] == pytest.approx(acc)
    assert out["relative_drop"] == pytest.approx([(50 - a) / 50 for a in acc])
    assert out["mean_relative_drop"] == pytest.approx(np.mean([(50 - a) / 50 for a in acc]))

# -----------------------------------------------------------------------------------------------------------------
# the command line end to end


CAPTIONS = ["a dog runs on the grass", "a red car parked on the street", "two people ride bikes", "a cat sleeps",
            "a man holds a surfboard", "a bird on a branch", "children play football in a park"]


def _tokenizer_files(tmp_path):
    """A small merges file learned with data.learn_bpe and the config JSON whose vocab matches it."""
    merges = tmp_path / "bpe.txt.gz"
    data.learn_bpe(CAPTIONS * 3, str(merges), 64)
    vocab = data.Tokenizer(str(merges)).vocab_size
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": "tiny", "vocab_size": vocab}))
    return str(merges), str(cfg), vocab


def _flickr(root, n_test=3):
    folder = os.path.join(root, "flickr30k")
    _write_images(os.path.join(folder, "flickr30k-images"), n_test + 1, seed=9)
    images = [{"filename": f"img{i}.png", "split": "test" if i < n_test else "train",
               "sentences": [{"raw": random.Random(i * 10 + j).choice(CAPTIONS)} for j in range(6 if i == 0 else 5)]}
              for i in range(n_test + 1)]
    with open(os.path.join(folder, "dataset_flickr30k.json"), "w") as f:
        json.dump({"images": images, "dataset": "flickr30k"}, f)


def _nights(root):
    """A NIGHTS folder as INTERFACES §2 describes it (for data.NightsTriplets once it exists)."""
    import csv
    rows = []
    for i in range(6):
        for k, (sub, name) in enumerate((("ref", f"{i:03d}.png"), ("distort", f"{i:03d}_0.png"),
                                         ("distort", f"{i:03d}_1.png"))):
            _write_images(os.path.join(root, sub, "000"), 1, seed=100 + 3 * i + k)
            os.replace(os.path.join(root, sub, "000", "img0.png"), os.path.join(root, sub, "000", name))
        split = ["train", "val", "test", "test", "test", "val"][i]
        rows.append(dict(id=i, left_vote=0.0 if i % 2 else 1.0, right_vote=1.0 if i % 2 else 0.0, votes=6,
                         ref_path=f"ref/000/{i:03d}.png", left_path=f"distort/000/{i:03d}_0.png",
                         right_path=f"distort/000/{i:03d}_1.png", split=split, is_imagenet=str(i % 2 == 0)))
    with open(os.path.join(root, "data.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _images(n, seed, size=24):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(rng.integers(0, 255, 3) + rng.normal(0, 40, (size, size, 3)), 0, 255)
                            .astype(np.uint8)) for _ in range(n)]


def _wds_copy(folder, samples, classnames=None, templates=None, dataset_type=None, shards=2):
    """A webdataset copy as clip_benchmark's exporter writes one (clip_benchmark/webdataset_builder.py, with
    webdataset's TarWriter): test/0.tar ... holding samples s0000000 ... of an image (webp, png and jpg in turn) and
    its `cls` label, or its captions in `txt`, one per line; test/nshards.txt, classnames.txt,
    zeroshot_classification_templates.txt, dataset_type.txt. samples: [(PIL image, label or [captions])]."""
    wds = pytest.importorskip("webdataset")
    os.makedirs(os.path.join(folder, "test"))
    per = math.ceil(len(samples) / shards)
    for k in range(shards):
        with wds.TarWriter(os.path.join(folder, "test", f"{k}.tar")) as sink:
            for i in range(k * per, min(len(samples), (k + 1) * per)):
                image, target = samples[i]
                ext = ("webp", "png", "jpg")[i % 3]
                buf = io.BytesIO()
                image.save(buf, **{"webp": dict(format="webp", lossless=True), "png": dict(format="png"),
                                   "jpg": dict(format="jpeg")}[ext])
                field = {"cls": target} if isinstance(target, int) else {"txt": "\n".join(target)}
                sink.write({"__key__": "s%07d" % i, ext: buf.getvalue(), **field})
    lines = {"test/nshards.txt": [str(shards)], "classnames.txt": classnames,
             "zeroshot_classification_templates.txt": templates, "dataset_type.txt": dataset_type and [dataset_type]}
    for name, rows in lines.items():
        if rows:
            with open(os.path.join(folder, name), "w") as f:
                print(*rows, sep="\n", end="\n", file=f)  # as the exporter prints them
    return str(folder)


def test_cli_end_to_end_with_compare_and_skips(tmp_path):
    merges, cfg, vocab = _tokenizer_files(tmp_path)
    root = tmp_path / "data"
    _imagenet_a(root)
    (root / "imagenet-o").mkdir()  # there but empty
    _flickr(root)
    _nights(tmp_path / "nights")
    torch.save(tiny_model(seed=1, vocab_size=vocab).state_dict(), tmp_path / "ours.pt")
    torch.save(tiny_model(seed=2, vocab_size=vocab).state_dict(), tmp_path / "base.pt")
    out = tmp_path / "out"
    ev.main(["--checkpoint", str(tmp_path / "ours.pt"), "--config", cfg, "--merges", merges,
             "--data-root", str(root), "--datasets", "imagenet-a,cifar10,imagenet-o", "--retrieval", "flickr30k,coco",
             "--nights", str(tmp_path / "nights"), "--out", str(out), "--compare", str(tmp_path / "base.pt"),
             "--workers", "0", "--device", "cpu", "--batch-size", "4"])
    res = json.loads((out / "results.json").read_text())
    ours, base, comp = res["ours"], res["base"], res["comparison"]
    za = ours["zeroshot"]["imagenet-a"]  # 3 of ImageNet-A's 200 class folders: still the 200-way task, flagged
    assert za["n"] == 9 and za["n_classes"] == 200 and za["n_classes_with_images"] == 3 and 0 <= za["top1"] <= 100
    assert "only 3 of the 200 classes have images" in za["incomplete"] and za["split"] == "test"
    assert za["layout"] == "raw"
    assert za["path"] == str(root / "imagenet-a")
    assert ours["zeroshot"]["cifar10"] == {"skipped": "missing", "path": str(root / "cifar10")}
    assert ours["zeroshot"]["imagenet-o"]["skipped"].startswith("no images found")
    fl = ours["retrieval"]["flickr30k"]
    assert fl["n_images"] == 3 and fl["n_texts"] == 15  # the train image is left out, 5 captions kept per image
    assert fl["captions_per_image"] == 5 and fl["n_texts_in_files"] == 16  # image 0 has 6
    assert fl["split"] == "Karpathy test split" and fl["path"].endswith("dataset_flickr30k.json")
    assert fl["i2t_r10"] == 100.0 and fl["t2i_r10"] == 100.0  # 3 images: everything is within the top 10
    assert ours["retrieval"]["coco"]["skipped"].startswith("missing")
    assert ours["families"]["ImageNet OOD"]["top1"] == pytest.approx(za["top1"])
    # compare: Δ is ours - base, the count follows the rounded Δ
    d = comp["datasets"]["imagenet-a"]["top1"]
    assert d["delta"] == pytest.approx(za["top1"] - base["zeroshot"]["imagenet-a"]["top1"])
    want = "win" if round(d["delta"], 1) > 0 else "loss" if round(d["delta"], 1) < 0 else "tie"
    assert comp["top1_count"][want] == 1 and sum(comp["top1_count"].values()) == 1
    assert comp["retrieval"]["flickr30k"]["i2t_r1"]["delta"] == pytest.approx(
        fl["i2t_r1"] - base["retrieval"]["flickr30k"]["i2t_r1"])
    assert ours["nights"]["val"]["n"] == 2 and 0 <= ours["nights"]["val"]["2afc"] <= 100
    assert ours["nights"]["test"]["n"] == 3
    n = comp["nights"]["val"]  # NIGHTS 2AFC is compared too
    assert n["delta"] == pytest.approx(ours["nights"]["val"]["2afc"] - base["nights"]["val"]["2afc"])
    # the models are named by their checkpoints, with the configs they were read as
    lo, lb = f"{tmp_path.name}/ours.pt", f"{tmp_path.name}/base.pt"
    assert (ours["label"], base["label"]) == (lo, lb) and ours["config"]["vocab_size"] == vocab
    md = (out / "report.md").read_text()
    assert f"| {lo} | `{tmp_path / 'ours.pt'}` | `{{" in md and f"| {lb} | `{tmp_path / 'base.pt'}` |" in md
    assert '"vocab_size":%d' % vocab in md and f"Δ = {lo} − {lb}." in md and "Ours" not in md
    assert f"- CIFAR-10: missing ({root / 'cifar10'})" in md
    assert "## NIGHTS 2AFC" in md and "| val | 2 |" in md
    assert f"| Dataset | Task | #Test | #Cls | {lo}@1 | {lb}@1 | Δ@1 | {lo}@5 | {lb}@5 | Δ@5 |" in md
    assert "| ImageNet-A | Visual recog. | 9 | 200 (3 with images) |" in md
    assert "| CIFAR-10 | Visual recog. | — | 10 | skipped |" in md
    assert "- ImageNet-A: only 3 of the 200 classes have images" in md.split("## Flagged")[1]
    assert "Flickr 1K Test I→T R@1" in md and "| Δ |" in md and comp["summary"] in md
    assert "Flickr 1K Test: 15 captions of 3 images (5 per image; 16 in the files)" in md
    assert f"- ImageNet-A: test (`{root / 'imagenet-a'}`)" in md.split("## Files and test splits read")[1]
    # the base model's own results.json (its run's "ours") is accepted in place of its checkpoint
    (tmp_path / "base_results.json").write_text(json.dumps({"ours": base}))
    ev.main(["--checkpoint", str(tmp_path / "ours.pt"), "--config", cfg, "--merges", merges,
             "--data-root", str(root), "--datasets", "imagenet-a", "--retrieval", "", "--out", str(tmp_path / "o2"),
             "--compare", str(tmp_path / "base_results.json"), "--workers", "0", "--device", "cpu"])
    res2 = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert res2["comparison"]["datasets"]["imagenet-a"] == comp["datasets"]["imagenet-a"]
    assert res2["base"]["label"] == lb and res2["ours"]["label"] == lo  # the base named by its recorded checkpoint


def test_cli_synthetic_world_with_compare(tmp_path):
    merges, cfg, vocab = _tokenizer_files(tmp_path)
    world = synthetic_world.make_synthetic_world(str(tmp_path / "world"), seed=0, n_pairs=0, n_triplets=30,
                                                 n_test_per_class=2, n_retrieval=4, image_size=32)
    torch.save(tiny_model(seed=1, vocab_size=vocab).state_dict(), tmp_path / "ours.pt")
    torch.save(tiny_model(seed=2, vocab_size=vocab).state_dict(), tmp_path / "base.pt")
    out = tmp_path / "out"
    ev.main(["--checkpoint", str(tmp_path / "ours.pt"), "--compare", str(tmp_path / "base.pt"), "--config", cfg,
             "--merges", merges, "--datasets", "", "--retrieval", "", "--synthetic", world.root, "--out", str(out),
             "--workers", "0", "--device", "cpu"])
    res = json.loads((out / "results.json").read_text())
    syn, tasks = res["ours"]["synthetic"], synthetic_world.synthetic_zeroshot_tasks()
    for task, (classnames, _) in tasks.items():
        r = syn["zeroshot"][task]
        assert r["n"] == 2 * len(classnames) and r["n_classes"] == len(classnames)
        assert (r["top5"] is None) == (len(classnames) <= 5)
        d = res["comparison"]["synthetic"]["zeroshot"][task]["top1"]
        assert d["delta"] == pytest.approx(r["top1"] - res["base"]["synthetic"]["zeroshot"][task]["top1"])
    assert syn["retrieval"]["n_images"] == 4 and syn["retrieval"]["n_texts"] == 20
    assert res["ours"]["nights"]["val"]["n"] > 0  # --synthetic also points NIGHTS at the world's stand-in
    md = (out / "report.md").read_text()
    assert "## Synthetic world (CPU demo)" in md and "| shape top1 | 10 |" in md and "| retrieval i2t_r1 | 4 |" in md


def _wds_mnist(root, n=40, seed=0):
    """A small MNIST webdataset copy (10 classes, 1 template: cheap to score), labels 0..9 in turn."""
    p = ev.prompts()["mnist"]
    return _wds_copy(os.path.join(root, "wds_mnist"), [(im, i % 10) for i, im in enumerate(_images(n, seed))],
                     classnames=p["classes"], templates=p["templates"])


def test_cli_scaling_names_each_run_by_its_path_and_fits_each_on_its_own(tmp_path):
    merges, cfg, vocab = _tokenizer_files(tmp_path)
    root = tmp_path / "data"
    _wds_mnist(root)
    runs = []
    for k, seed in (("s0", 0), ("s1", 1)):  # two seeds of one recipe: both run folders are called "pi"
        run = tmp_path / k / "pi"
        run.mkdir(parents=True)
        for epoch in (1, 2, 4):
            torch.save(tiny_model(seed=10 * seed + epoch, vocab_size=vocab).state_dict(), run / f"epoch_{epoch}.pt")
        runs.append(str(run))
    out = tmp_path / "out"
    args = ["--scaling", ",".join(runs), "--samples-per-epoch", "1000", "--config", cfg, "--merges", merges,
            "--data-root", str(root), "--datasets", "mnist", "--retrieval", "", "--out", str(out),
            "--workers", "0", "--device", "cpu", "--no-cache"]
    ev.main(args)
    rows = list(csv.DictReader(open(out / "scaling.csv")))
    assert [r["run"] for r in rows] == ["s0/pi"] * 3 + ["s1/pi"] * 3
    assert [int(r["samples_seen"]) for r in rows] == [1000, 2000, 4000] * 2
    fits = json.loads((out / "scaling_fit.json").read_text())
    curve = "Misc. / Domain & Small top1"
    for label in ("s0/pi", "s1/pi"):  # each run's fit from its own three points only
        accs = [float(r[curve]) for r in rows if r["run"] == label]
        assert fits[f"{label}: {curve}"] == ev.fit_power_law([1000, 2000, 4000], accs)
    assert fits[f"s0/pi: {curve}"] != fits[f"s1/pi: {curve}"]
    with Image.open(out / "scaling.png") as im:  # drawn by plots.py from scaling.csv
        assert im.format == "PNG"
    with pytest.raises(SystemExit, match="scaling.csv exists"):  # an earlier evaluation is never replaced unasked
        ev.main(args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no per-epoch checkpoints"):
        ev.main(args[:1] + [str(tmp_path / "empty")] + args[2:] + ["--overwrite"])


def test_evaluate_and_plots_do_not_import_each_other():
    """The power-law fit lives in evaluate.py; plots.py imports it from there, and evaluate.py runs plots.py as a
    script (draw_scaling) instead of importing it."""
    import ast
    tree = ast.parse(open(ev.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "plots" not in imported and "matplotlib" not in imported
    plots_src = open(os.path.join(os.path.dirname(ev.__file__), "plots.py")).read()
    assert "from evaluate import fit_power_law" in plots_src and "def fit_power_law" not in plots_src


# -----------------------------------------------------------------------------------------------------------------
# a run that meets bad files: each failure is recorded for its set, results.json keeps what was measured


def _broken_sets(root):
    """Sets whose metadata is there but whose images are not, a 0-byte JPEG among good images, a bad Karpathy JSON."""
    _imagenet_a(root)
    open(os.path.join(root, "imagenet-a", WNIDS[0], "broken.jpg"), "wb").close()  # 0 bytes
    scenes = {"scenes": [{"image_filename": "CLEVR_val_000000.png", "objects": [{"pixel_coords": [1, 2, 9.0]}]}]}
    _touch(os.path.join(root, "clevr/CLEVR_v1.0/scenes/CLEVR_val_scenes.json"), json.dumps(scenes))
    voc = os.path.join(root, "voc2007/VOCdevkit/VOC2007")
    _touch(os.path.join(voc, "ImageSets/Main/test.txt"), "000001\n")
    _touch(os.path.join(voc, "Annotations/000001.xml"), "<annotation><object><name>dog</name><bndbox><xmin>1</xmin>"
           "<ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object></annotation>")
    _touch(os.path.join(root, "kitti/training/label_2/000000.txt"), "Car 0 0 0 1 2 3 4 1 1 1 0 0 5.0 0\n")
    _touch(os.path.join(root, "flickr30k/dataset_flickr30k.json"), json.dumps({"dataset": "flickr30k"}))


def test_bad_files_are_recorded_per_set_and_the_run_goes_on(tmp_path):
    merges, cfg, vocab = _tokenizer_files(tmp_path)
    root = tmp_path / "data"
    _broken_sets(str(root))
    torch.save(tiny_model(seed=1, vocab_size=vocab).state_dict(), tmp_path / "ours.pt")
    torch.save(tiny_model(seed=2, vocab_size=vocab).state_dict(), tmp_path / "base.pt")
    out = tmp_path / "out"
    ev.main(["--checkpoint", str(tmp_path / "ours.pt"), "--config", cfg, "--merges", merges,
             "--data-root", str(root),
             "--datasets", "clevr_count_all,imagenet-a,voc2007,kitti_closest_vehicle_distance",
             "--retrieval", "flickr30k", "--out", str(out), "--compare", str(tmp_path / "base.pt"),
             "--workers", "0", "--device", "cpu"])
    res = json.loads((out / "results.json").read_text())
    for who in ("ours", "base"):
        z = res[who]["zeroshot"]
        za = z["imagenet-a"]  # the 0-byte JPEG is skipped and counted; the other 9 images are evaluated
        assert za["n"] == 9 and za["n_unreadable"] == 1 and "broken.jpg" in za["unreadable"][0]
        for name, folder, image in (("clevr_count_all", "clevr", "CLEVR_val_000000.png"),
                                    ("voc2007", "voc2007", "000001.jpg"),
                                    ("kitti_closest_vehicle_distance", "kitti", "000000.png")):
            assert z[name]["path"] == str(root / folder)
            assert "none of the 1 images could be read" in z[name]["skipped"] and image in z[name]["skipped"], name
        fl = res[who]["retrieval"]["flickr30k"]
        assert '"images"' in fl["skipped"] and fl["path"].endswith("dataset_flickr30k.json")
    assert res["comparison"]["top1_count"]["win"] + res["comparison"]["top1_count"]["loss"] + \
        res["comparison"]["top1_count"]["tie"] == 1
    md = (out / "report.md").read_text()
    skipped = md.split("## Skipped (files not found, unreadable or failed)")[1].split("## Files")[0]
    assert skipped.startswith(f"\n\n**{tmp_path.name}/ours.pt**")
    ours_part, base_part = skipped.split(f"**{tmp_path.name}/base.pt**")
    for part in (ours_part, base_part):  # both models' skips are listed
        assert "- CLEVR-Count: none of the 1 images" in part and "- PASCAL VOC 07:" in part
        assert "- KITTI-CVD:" in part and "- Flickr 1K Test:" in part and "- ImageNet-A: 1 unreadable" in part
    assert not list(out.glob("*.tmp"))


def test_results_json_keeps_what_a_killed_run_measured(tmp_path, monkeypatch):
    merges, cfg, vocab = _tokenizer_files(tmp_path)
    root = tmp_path / "data"
    _imagenet_a(root)
    _flickr(root)
    torch.save(tiny_model(seed=1, vocab_size=vocab).state_dict(), tmp_path / "ours.pt")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C or a scheduler's SIGINT does mid-run: not recorded, the run ends

    monkeypatch.setattr(ev, "retrieval_eval", killed)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ev.main(["--checkpoint", str(tmp_path / "ours.pt"), "--config", cfg, "--merges", merges,
                 "--data-root", str(root), "--datasets", "imagenet-a,cifar10", "--retrieval", "flickr30k",
                 "--out", str(out), "--workers", "0", "--device", "cpu"])
    res = json.loads((out / "results.json").read_text())
    assert res["ours"]["zeroshot"]["imagenet-a"]["n"] == 9 and res["ours"]["zeroshot"]["cifar10"]["skipped"]
    assert res["ours"]["families"]["ImageNet OOD"]["top1"] == res["ours"]["zeroshot"]["imagenet-a"]["top1"]
    assert res["ours"]["checkpoint"] == str(tmp_path / "ours.pt") and "flickr30k" not in res["ours"]["retrieval"]


def test_compare_with_nights_skipped_in_both_runs():
    ours, base = _paper_results("ours"), _paper_results("base")
    for res in (ours, base):
        res["nights"] = ev.skipped("missing", "/data/nights-2afc")  # a path containing "2afc"
    c = ev.compare(ours, base)
    assert c["nights"] is None and c["top1_count"] == {"win": 23, "tie": 1, "loss": 5}
    md = ev.report_markdown(ours, base, c)
    assert "## NIGHTS 2AFC\n\nskipped: missing (/data/nights-2afc)" in md
    assert "- NIGHTS: missing (/data/nights-2afc)" in md.split("**Base**")[1]


def test_classifier_cache_key_covers_the_model_config(tmp_path):
    merges, cfg, vocab = _tokenizer_files(tmp_path)
    quick = tmp_path / "quick.json"
    quick.write_text(json.dumps({"model": "tiny", "vocab_size": vocab, "quick_gelu": True}))
    root = tmp_path / "data"
    _imagenet_a(root, per_class=1)
    torch.save(tiny_model(seed=1, vocab_size=vocab).state_dict(), tmp_path / "ours.pt")
    out = tmp_path / "out"
    tops = []
    for config in (cfg, str(quick), cfg):  # one checkpoint read with GELU, with QuickGELU, with GELU again
        ev.main(["--checkpoint", str(tmp_path / "ours.pt"), "--config", config, "--merges", merges,
                 "--data-root", str(root), "--datasets", "imagenet-a", "--retrieval", "", "--out", str(out),
                 "--workers", "0", "--device", "cpu", "--overwrite"])
        tops.append(json.loads((out / "results.json").read_text())["ours"]["zeroshot"]["imagenet-a"])
    assert len(list((out / "cache").glob("classifier-*.pt"))) == 2  # one per config; the third run reuses the first
    assert tops[2] == tops[0]


def test_imagenetv2_in_clip_benchmarks_layout(tmp_path):
    for d in ("0", "10", "2"):
        _touch(str(tmp_path / f"imagenetv2/ImageNetV2-matched-frequency/{d}/a.jpeg"))
    ds, classes, _ = ev.build_dataset("imagenetv2", str(tmp_path / "imagenetv2"), lambda x: x)
    assert [y for _, y in ds.items] == [0, 10, 2] and len(classes) == 1000
    assert all("ImageNetV2-matched-frequency" in p for p, _ in ds.items)


def test_kitti_bins_as_vtab():
    # VTAB (task_adaptation/data/kitti.py, as clip_benchmark ships it): label = max{i : thresholds[i] < distance}
    # with thresholds (-100, 8, 20, 999): a distance on a threshold stays in the lower bin
    for distance, label in ((0.5, 0), (8.0, 0), (8.01, 1), (20.0, 1), (20.5, 2), (999.0, 2), (1000.0, 3)):
        assert ev.kitti_label(distance) == label, distance


def test_kitti_reader_puts_8_metres_in_class_0(tmp_path):
    _touch(str(tmp_path / "kitti/training/label_2/000000.txt"), "Car 0 0 0 1 2 3 4 1 1 1 0 0 8.00 0\n")
    ds, _, _ = ev.build_dataset("kitti_closest_vehicle_distance", str(tmp_path / "kitti"), lambda x: x)
    assert [y for _, y in ds.items] == [0]
    assert "TFDS's kitti `test` split (711 images" in " ".join(ev.read_kitti.__doc__.split())


def test_resisc45_class_names_are_clip_benchmarks(tmp_path):
    import clip_benchmark.datasets.builder as cb
    names = ev.prompts()["resisc45"]["classes"]
    # clip_benchmark's vtab/resisc45 passes no class list (so TFDS's ClassLabel names are used, underscores kept), and
    # its en_classnames.json has no resisc45 entry that would replace them
    source = open(cb.__file__).read()
    start = source.index('elif dataset_name == "resisc45":')
    branch = source[start:source.index("elif dataset_name", start + 1)]
    assert "classes =" not in branch and "Resisc45Data" in branch
    en = json.load(open(os.path.join(os.path.dirname(cb.__file__), "en_classnames.json")))
    assert "resisc45" not in en
    assert len(names) == 45 and names == sorted(names) and "baseball_diamond" in names and "sea_ice" in names
    for d in ("sea_ice", "airplane", "baseball_diamond"):
        for i in range(5):
            _touch(str(tmp_path / f"resisc45/NWPU-RESISC45/{d}/{d}_{i:03d}.jpg"))
    ds, classes, _ = ev.build_dataset("resisc45", str(tmp_path / "resisc45"), lambda x: x)
    assert classes == names and len(ds.items) == 3  # 20% of 15
    assert all(classes[y] == os.path.basename(os.path.dirname(p)) for p, y in ds.items)


@pytest.fixture
def cb_zeroshot(monkeypatch):
    """clip_benchmark's zero-shot classification module, run as it is under the dev requirements (numpy < 2.4).
    Under numpy >= 2.4 its top-k `accuracy` fails (float() of a one-element array); there, and only there, its own
    lines ending in .item() stand in for it, so that the reference still runs."""
    pytest.importorskip("sklearn")  # its metric module imports it (requirements-dev.txt)
    from clip_benchmark.metrics import zeroshot_classification as cbz
    if tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        def accuracy(output, target, topk=(1,)):
            pred = output.topk(max(topk), 1, True, True)[1].t()
            correct = pred.eq(target.view(1, -1).expand_as(pred))
            return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / len(target) for k in topk]
        monkeypatch.setattr(cbz, "accuracy", accuracy)
    return cbz


def test_zero_shot_metrics_match_clip_benchmark(tmp_path, cb_zeroshot):
    model = tiny_model(seed=4)
    tok = CharTokenizer(context_length=model.context_length)  # clip_benchmark calls tok(texts)
    wnids = ev.set_wnids("imagenet-a")[:6]
    for j, w in enumerate(wnids):  # unequal class sizes, so mean per-class recall differs from top-1
        _write_images(str(tmp_path / "imagenet-a" / w), 2 + 2 * j, seed=20 + j)
    ds, classes, _ = ev.build_dataset("imagenet-a", str(tmp_path / "imagenet-a"),
                                      data.eval_transform(model.config.image_size))
    classes = classes[:6]  # the six classes with images (a random tiny model gets none of 200 right)
    templates = ev.prompts()["imagenet-a"]["templates"][:4]
    ours = ev.zero_shot_on(model, tok, ds, classes, templates, batch_size=7, workers=0)
    # clip_benchmark's own evaluate(): its classifier, logits, top-k accuracy and sklearn's balanced accuracy
    ds.classes = classes  # it reads the class count from dataloader.dataset.classes
    ref = cb_zeroshot.evaluate(model, torch.utils.data.DataLoader(ds, batch_size=7), tok, classes, templates, "cpu",
                               amp=False)
    assert ours["top1"] == pytest.approx(100 * ref["acc1"], abs=1e-4)
    assert ours["top5"] == pytest.approx(100 * ref["acc5"], abs=1e-4)
    assert ours["mean_per_class_recall"] == pytest.approx(100 * ref["mean_per_class_recall"], abs=1e-4)
    assert ours["mean_per_class_recall"] != pytest.approx(ours["top1"])


# -----------------------------------------------------------------------------------------------------------------
# clip_benchmark's webdataset copies (wds_<name>/): read with tarfile, scored as clip_benchmark scores them


def test_wds_classification_matches_clip_benchmarks_reader_and_metrics(tmp_path, cb_zeroshot):
    from clip_benchmark.datasets.builder import build_dataset as cb_build_dataset
    model = tiny_model(seed=5, context_length=77)  # EuroSAT's prompts are long: 32 characters would cut the names
    tok = CharTokenizer(context_length=model.context_length)
    p = ev.prompts()["eurosat"]
    samples = [(im, [0, 3, 3, 7, 9, 1][i % 6]) for i, im in enumerate(_images(31, seed=3))]  # unequal classes
    root = _wds_copy(tmp_path / "wds_vtab-eurosat", samples, classnames=p["classes"], templates=p["templates"],
                     shards=3)
    tf = data.eval_transform(model.config.image_size)
    # clip_benchmark: webdataset reads the copy (build_wds_dataset), its own classifier, logits and metrics, fp32
    ref_ds = cb_build_dataset("wds/vtab/eurosat", root=root, transform=tf, split="test", download=False,
                              task="zeroshot_classification")
    assert ref_ds.classes == p["classes"] and ref_ds.templates == p["templates"]
    loader = torch.utils.data.DataLoader(ref_ds.batched(7), batch_size=None)
    clf = cb_zeroshot.zero_shot_classifier(model, tok, ref_ds.classes, ref_ds.templates, "cpu", amp=False)
    ref_logits, ref_labels = cb_zeroshot.run_classification(model, clf, loader, "cpu", amp=False)
    ref = cb_zeroshot.evaluate(model, loader, tok, ref_ds.classes, ref_ds.templates, "cpu", amp=False)
    # ours: the same files through tarfile
    ds, classes, info = ev.build_dataset("eurosat", root, tf)
    logits, labels, unreadable = ev.zero_shot_logits(model, tok, ds, classes, p["templates"], batch_size=7,
                                                     workers=0)
    assert classes == p["classes"] and not unreadable and len(labels) == 31
    assert torch.equal(labels, ref_labels) and torch.equal(logits.argmax(1), ref_logits.argmax(1))
    top5 = lambda x: x.topk(5, dim=1).indices.sort(dim=1).values  # noqa: E731
    assert torch.equal(top5(logits), top5(ref_logits))
    torch.testing.assert_close(logits, ref_logits, atol=5e-5, rtol=0)
    r = ev.zero_shot_eval(model, tok, "eurosat", root, batch_size=7, workers=0)
    assert r["top1"] == pytest.approx(100 * ref["acc1"], abs=1e-4)
    assert r["top5"] == pytest.approx(100 * ref["acc5"], abs=1e-4)
    assert r["mean_per_class_recall"] == pytest.approx(100 * ref["mean_per_class_recall"], abs=1e-4)
    assert r["n"] == 31 and r["n_classes"] == 10 and r["n_classes_with_images"] == 5 and "incomplete" in r
    assert r["split"].startswith("VTAB's test split") and r["layout"] == "webdataset" and r["path"] == root
    assert info["classnames"] == "ours (the copy's classnames.txt is the same)"


def test_wds_retrieval_matches_clip_benchmark_with_every_caption_or_five(tmp_path):
    from clip_benchmark.datasets.builder import build_dataset as cb_build_dataset
    from clip_benchmark.metrics import zeroshot_retrieval as zr
    model = tiny_model(seed=6)
    tok = CharTokenizer(context_length=model.context_length)
    tf = data.eval_transform(model.config.image_size)
    rng = random.Random(0)
    captions = [[f"{rng.choice(CAPTIONS)} {i} {j}" for j in range(5 + i % 3)] for i in range(12)]  # 5, 6 or 7 each
    images = _images(12, seed=4)
    every = _wds_copy(tmp_path / "every" / "wds_flickr30k", list(zip(images, captions)), dataset_type="retrieval")
    five = _wds_copy(tmp_path / "five" / "wds_flickr30k", [(im, c[:5]) for im, c in zip(images, captions)],
                     dataset_type="retrieval", shards=3)

    def reference(root):  # clip_benchmark on a copy, every caption in it
        ds = cb_build_dataset("wds/flickr30k", root=root, transform=tf, split="test", download=False,
                              task="zeroshot_retrieval")
        loader = torch.utils.data.DataLoader(ds.batched(5), batch_size=None)
        return zr.evaluate(model, loader, tok, "cpu", amp=False, recall_k_list=[1, 5, 10])
    n_all = sum(map(len, captions))
    for root, per_image, ref_root, n_texts in ((every, 0, every, n_all), (every, 5, five, 60), (five, 5, five, 60)):
        ours = ev.retrieval_eval(model, tok, root, batch_size=5, workers=0, captions_per_image=per_image)
        ref = reference(ref_root)
        for k in (1, 5, 10):  # clip_benchmark: text_retrieval = image queries, image_retrieval = caption queries
            assert ours[f"i2t_r{k}"] == pytest.approx(100 * ref[f"text_retrieval_recall@{k}"])
            assert ours[f"t2i_r{k}"] == pytest.approx(100 * ref[f"image_retrieval_recall@{k}"])
        assert ours["n_images"] == 12 and ours["n_texts"] == n_texts
        assert ours["captions_per_image"] == (per_image or "all")
        assert ours["n_texts_in_files"] == (n_all if root == every else 60)
        assert ours["split"] == "test (as the webdataset copy holds it)" and ours["path"] == root


def test_wds_classnames_stay_ours_in_the_copys_label_order_and_differences_are_reported():
    cb = pytest.importorskip("clip_benchmark.datasets.builder")
    en = json.load(open(os.path.join(os.path.dirname(cb.__file__), "en_classnames.json")))
    # Caltech-101's copy comes from TFDS, whose label order is not the folders': its classnames.txt gives the order
    ours = ev.prompts()["caltech101"]["classes"]
    classes, note = ev.wds_classnames("caltech101", en["caltech101_vtab"])
    assert classes == en["caltech101_vtab"] != ours and sorted(classes) == sorted(ours)
    assert note["classnames_reordered"]
    # a name spelt differently: ours is kept, the place reported
    mnist = ev.prompts()["mnist"]["classes"]
    theirs = [*mnist[:3], "three", *mnist[4:]]
    classes, note = ev.wds_classnames("mnist", theirs)
    assert classes == mnist and note["classnames_differ"] == [{"label": 3, "copy": "three", "ours": mnist[3]}]
    with pytest.raises(ValueError, match="classnames.txt has 9 names, MNIST has 10 classes"):
        ev.wds_classnames("mnist", mnist[:9])
    with pytest.raises(ValueError, match="differs from our class names at 10 of 10 places"):
        ev.wds_classnames("mnist", [f"digit {i}" for i in range(10)])
    # where ours come from the raw files (torchvision's list), the copy's, with clip_benchmark's Food-101 spaces
    classes, note = ev.wds_classnames("food101", [f"dish_{i}" for i in range(101)])
    assert classes[:2] == ["dish 0", "dish 1"] and "copy's classnames.txt" in note["classnames"]
    # ImageNet-R: ImageNet's names of its 200 wnids, whatever files there are
    names = ev.imagenet_names()
    assert ev.our_classnames("imagenet-r") == [names[w] for w in ev.set_wnids("imagenet-r")]


def test_wds_bad_samples_are_counted_and_a_damaged_shard_names_itself(tmp_path):
    wds = pytest.importorskip("webdataset")
    model, tok = tiny_model(seed=8), CharTokenizer()
    root = _wds_mnist(tmp_path, n=6)
    with wds.TarWriter(os.path.join(root, "test", "2.tar")) as sink:  # a third shard: one sample without a label
        buf = io.BytesIO()
        _images(1, seed=9)[0].save(buf, format="png")
        sink.write({"__key__": "s0000006", "png": buf.getvalue()})
    (tmp_path / "wds_mnist" / "test" / "nshards.txt").write_text("3\n")
    r = ev.zero_shot_eval(model, tok, "mnist", root, workers=0)
    assert r["n"] == 6 and r["n_unreadable"] == 1
    assert "2.tar:s0000006" in r["unreadable"][0] and "no label" in r["unreadable"][0]
    (tmp_path / "wds_mnist" / "test" / "nshards.txt").write_text("4\n")
    with pytest.raises(ev.DatasetUnavailable, match="1 of the 4 shards nshards.txt counts are missing"):
        ev.zero_shot_eval(model, tok, "mnist", root, workers=0)
    (tmp_path / "wds_mnist" / "test" / "nshards.txt").write_text("3\n")
    shard = os.path.join(root, "test", "0.tar")
    import tarfile
    with tarfile.open(shard) as tar:
        second = [m for m in tar][2].offset  # where the second sample's first header starts
    with open(shard, "r+b") as f:  # cut between two samples: tarfile alone would just stop there
        f.truncate(second)
    with pytest.raises(ev.DatasetUnavailable, match="0.tar: ReadError: no end-of-archive blocks"):
        ev.zero_shot_eval(model, tok, "mnist", root, workers=0)


def test_partial_imagenet_r_is_scored_over_all_200_classes_and_flagged(tmp_path, cb_zeroshot):
    from clip_benchmark.datasets.builder import build_dataset as cb_build_dataset
    model = tiny_model(seed=7, context_length=77)
    tok = CharTokenizer(context_length=model.context_length)
    folder = tmp_path / "imagenet-r"
    for j, w in enumerate(ev.set_wnids("imagenet-r")[:3]):  # 3 of the 200 class folders
        _write_images(str(folder / w), 3 + j, seed=30 + j)
    ours = ev.zero_shot_eval(model, tok, "imagenet-r", str(folder), batch_size=5, workers=0)
    assert ours["n"] == 12 and ours["n_classes"] == 200 and ours["n_classes_with_images"] == 3
    assert ours["incomplete"].startswith("only 3 of the 200 classes have images")
    # clip_benchmark keeps all 200 names too; it labels by ImageFolder's index of the folders present, which for the
    # set's first three wnids is their place in the 200, so here it scores the same task
    ref_ds = cb_build_dataset("imagenet-r", root=str(folder), transform=data.eval_transform(model.config.image_size),
                              split="test", download=False, task="zeroshot_classification")
    assert ref_ds.classes == ev.our_classnames("imagenet-r") and ref_ds.templates == ev.prompts()["imagenet-r"][
        "templates"]
    ref = cb_zeroshot.evaluate(model, torch.utils.data.DataLoader(ref_ds, batch_size=5), tok, ref_ds.classes,
                               ref_ds.templates, "cpu", amp=False)
    assert ours["top1"] == pytest.approx(100 * ref["acc1"], abs=1e-4)
    assert ours["top5"] == pytest.approx(100 * ref["acc5"], abs=1e-4)
    assert ours["mean_per_class_recall"] == pytest.approx(100 * ref["mean_per_class_recall"], abs=1e-4)
    (folder / "n99999999").mkdir()  # a folder that is none of ImageNet-R's classes is an error, not ignored
    with pytest.raises(ev.DatasetUnavailable, match="not imagenet-r wnids: n99999999"):
        ev.zero_shot_eval(model, tok, "imagenet-r", str(folder), workers=0)


# -----------------------------------------------------------------------------------------------------------------
# results that stay and say what they are


def test_cli_reads_webdataset_copies_first_refuses_to_overwrite_and_fails_when_nothing_was_measured(tmp_path):
    merges, cfg, vocab = _tokenizer_files(tmp_path)
    root = tmp_path / "data"
    _imagenet_a(root, per_class=1)  # the raw folder (3 images) and the copy (4) are both there: the copy is read
    p = ev.prompts()["imagenet-a"]
    _wds_copy(root / "wds_imagenet-a", [(im, i % 2) for i, im in enumerate(_images(4, seed=11))],
              classnames=ev.our_classnames("imagenet-a"), templates=p["templates"])
    mnist = ev.prompts()["mnist"]
    _wds_copy(root / "wds_mnist_test", [(im, i % 10) for i, im in enumerate(_images(10, seed=12))],  # DataComp's name
              classnames=[*mnist["classes"][:3], "three", *mnist["classes"][4:]], templates=mnist["templates"])
    _wds_copy(root / "wds_flickr30k", [(im, CAPTIONS[i:i + 6]) for i, im in enumerate(_images(2, seed=13))],
              dataset_type="retrieval")
    torch.save(tiny_model(seed=1, vocab_size=vocab).state_dict(), tmp_path / "ours.pt")
    out = tmp_path / "out"
    args = ["--checkpoint", str(tmp_path / "ours.pt"), "--config", cfg, "--merges", merges, "--data-root", str(root),
            "--datasets", "imagenet-a,mnist", "--retrieval", "flickr30k", "--out", str(out), "--workers", "0",
            "--device", "cpu"]
    ev.main(args)
    res = json.loads((out / "results.json").read_text())["ours"]
    za, zm, fl = res["zeroshot"]["imagenet-a"], res["zeroshot"]["mnist"], res["retrieval"]["flickr30k"]
    assert za["path"] == str(root / "wds_imagenet-a") and za["n"] == 4 and za["layout"] == "webdataset"
    assert zm["path"] == str(root / "wds_mnist_test") and zm["classnames_differ"][0]["copy"] == "three"
    assert fl["path"] == str(root / "wds_flickr30k") and fl["n_texts"] == 10 and fl["n_texts_in_files"] == 12
    md = (out / "report.md").read_text()
    flagged = md.split("## Flagged")[1].split("## Files")[0]
    assert "- MNIST: ours; the copy's classnames.txt differs at 1 of 10 places: label 3: 'three' (ours '3')" in flagged
    assert "- ImageNet-A: only 2 of the 200 classes have images" in flagged
    read = md.split("## Files and test splits read")[1]
    assert f"- ImageNet-A: test (as the webdataset copy holds it) (`{root / 'wds_imagenet-a'}`)" in read
    # a second run into the same --out refuses, before any model is loaded; --overwrite replaces
    before = (out / "results.json").read_text()
    with pytest.raises(SystemExit, match=f"{out / 'results.json'} exists .* --overwrite to replace it"):
        ev.main(args)
    assert (out / "results.json").read_text() == before
    ev.main(args + ["--overwrite", "--captions-per-image", "0"])
    assert json.loads((out / "results.json").read_text())["ours"]["retrieval"]["flickr30k"]["n_texts"] == 12
    # a typo in --data-root: every set skipped, a non-zero exit with one line, and no results.json
    typo = args[:args.index("--data-root") + 1] + [str(tmp_path / "dat")] + args[args.index("--data-root") + 2:]
    typo[typo.index("--out") + 1] = str(tmp_path / "out2")
    with pytest.raises(SystemExit) as e:
        ev.main(typo)
    msg = str(e.value)
    assert msg.startswith("evaluate.py: nothing was measured for ") and "all 3 benchmarks were skipped" in msg
    assert "\n" not in msg and not (tmp_path / "out2" / "results.json").exists()


def test_help_shows_every_default_the_examples_and_the_layout(capsys):
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: data)", "(default: results)", "(default: all)", "(default: flickr30k,coco)",
                    "(default: 5)", "(default: 256)"):
        assert default in text, default
    assert "python evaluate.py --scaling runs/pi,runs/base" in text  # the usage examples
    assert " ".join(ev.layout_table().split()) in text  # the layout table, webdataset names included
    undocumented = [a.dest for a in ev.build_parser()._actions if not a.help]
    assert not undocumented, undocumented


def test_report_names_the_models_by_their_checkpoints(tmp_path):
    assert ev.short_labels(["runs/pi/epoch_32.pt", "runs/base/epoch_32.pt"], min_parts=2) == [
        "pi/epoch_32.pt", "base/epoch_32.pt"]
    assert ev.short_labels(["a/s0/pi", "a/s1/pi"]) == ["s0/pi", "s1/pi"]
    assert ev.short_labels(["x/pi", "y/base"]) == ["pi", "base"]
    ours, base = _paper_results("ours"), _paper_results("base")
    ours.update(label="pi/epoch_32.pt", checkpoint="/r/pi/epoch_32.pt", config={"quick_gelu": False})
    base.update(label="base/epoch_32.pt", checkpoint="/r/base/epoch_32.pt", config={"quick_gelu": True})
    md = ev.report_markdown(ours, base, ev.compare(ours, base))
    assert "| pi/epoch_32.pt | `/r/pi/epoch_32.pt` | `{\"quick_gelu\":false}` |" in md
    assert "| base/epoch_32.pt | `/r/base/epoch_32.pt` | `{\"quick_gelu\":true}` |" in md
    assert "| Dataset | Task | #Test | #Cls | pi/epoch_32.pt@1 | base/epoch_32.pt@1 | Δ@1 |" in md
    assert "pi/epoch_32.pt vs base/epoch_32.pt: better on 23 of 29" in md and "Ours" not in md


def test_layout_tables_in_docstring_and_readme_are_the_benchmark_table():
    assert set(ev.BENCHMARKS) <= {line.split()[0] for line in ev.layout_table().splitlines() if line.strip()}
    assert ev.layout_table() in ev.__doc__
    readme = open(os.path.join(os.path.dirname(ev.__file__), "README.md"), encoding="utf-8").read()
    assert ev.layout_table(markdown=True) in readme
