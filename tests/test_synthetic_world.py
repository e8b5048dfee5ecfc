"""The synthetic world of the CPU demo: deterministic, in the real on-disk formats, and labelled by its rule."""
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import tarfile
import time

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

import synthetic_world as world_gen

SMALL = dict(n_pairs=40, samples_per_shard=16, n_triplets=60, n_test_per_class=2, n_retrieval=8, image_size=32,
             processes=1)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    make = lambda name, **kw: world_gen.make_synthetic_world(str(tmp_path_factory.mktemp(name)), **{**SMALL, **kw})
    t = time.perf_counter()
    a = make("a", seed=0)
    seconds = time.perf_counter() - t
    return {"a": a, "seconds": seconds, "b": make("b", seed=0), "c": make("c", seed=1),
            "fewer_pairs": make("d", seed=0, n_pairs=20), "two_processes": make("e", seed=0, processes=2)}


def _files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _nights_rows(world):
    with open(os.path.join(world.nights, "data.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(world.nights, "changes.csv"), newline="") as f:
        changes = {r["id"]: r for r in csv.DictReader(f)}
    return rows, changes


def test_same_seed_same_bytes_other_seed_other_data(worlds):
    a, b, c, e = (_files(worlds[k].root) for k in ("a", "b", "c", "two_processes"))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert a.keys() == e.keys() and all(a[k] == e[k] for k in a)  # shards written by one process or several
    assert a["nights/data.csv"] != c["nights/data.csv"]
    assert a["nights/ref/000/000.png"] != c["nights/ref/000/000.png"]
    assert a["shards/00000.tar"] != c["shards/00000.tar"]
    # each part has its own seed: fewer image-text pairs leave the NIGHTS part byte-identical
    d = _files(worlds["fewer_pairs"].root)
    assert all(d[k] == a[k] for k in a if k.startswith("nights/"))


def test_generation_is_fast(worlds):
    n_images = 3 * 64 + 40 + 2 * 15 + 8  # NIGHTS (60 + ~4 tied rows), pairs, zero-shot, retrieval
    assert worlds["seconds"] < 10, f"{n_images} images took {worlds['seconds']:.1f} s"


def test_nights_format(worlds):
    w = worlds["a"]
    with open(os.path.join(w.nights, "data.csv"), newline="") as f:
        assert next(csv.reader(f)) == list(world_gen.SYNTH_NIGHTS_HEADER)
    rows, _ = _nights_rows(w)
    assert [int(r["id"]) for r in rows] == list(range(len(rows)))
    for r in rows:
        i = int(r["id"])
        assert (r["ref_path"], r["left_path"], r["right_path"]) == (
            f"ref/000/{i:03d}.png", f"distort/000/{i:03d}_0.png", f"distort/000/{i:03d}_1.png")
        for k in ("ref_path", "left_path", "right_path"):
            with Image.open(os.path.join(w.nights, r[k])) as im:
                assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"
        assert r["split"] in ("train", "val", "test") and r["is_imagenet"] in ("True", "False")
        assert math.isclose(float(r["left_vote"]) + float(r["right_vote"]), 1) and int(r["votes"]) > 0 and r["prompt"]
    # what the reference loader keeps (votes >= 6), per split: all five splits are non-empty
    kept = [r for r in rows if int(r["votes"]) >= 6]
    assert len(kept) == 60
    for split in ("train", "val", "test"):
        for flag in ("True", "False"):
            assert any(r["split"] == split and r["is_imagenet"] == flag for r in kept), (split, flag)


def test_nights_labels_follow_the_rule(worlds):
    rows, changes = _nights_rows(worlds["a"])
    cost = lambda r, side: world_gen.CHANGE_COST[changes[r["id"]][f"{side}_change"]]  # noqa: E731
    kept = [r for r in rows if int(r["votes"]) >= 6]
    for r in rows:
        votes, right_vote = int(r["votes"]), float(r["right_vote"])
        assert right_vote * votes == pytest.approx(round(right_vote * votes), abs=1e-3)  # a whole number of voters
        if votes >= 6:  # the changes cost differently: most voters pick the cheaper side
            assert cost(r, "left") != cost(r, "right")
        else:  # a tie: split votes, dropped by the reader
            assert cost(r, "left") == cost(r, "right") and 0 < right_vote < 1 and votes >= 3
    agree = [(float(r["right_vote"]) > 0.5) == (cost(r, "right") < cost(r, "left")) for r in kept]
    assert len(kept) == 60 and sum(agree) >= 0.85 * len(kept)
    assert len(rows) > len(kept)  # some ties are written, so the reader's filter has work to do


def test_observer_votes_follow_the_logistic_rule():
    rng = np.random.default_rng(0)
    # P(a voter picks right) = sigmoid(ln 4 * (cost left - cost right)): 4/5 for a difference of 1, 16/17 for 2
    for left, right, p_right in (("pose", "size", 1 / 5), ("size", "pose", 4 / 5), ("colour", "layout", 16 / 17),
                                 ("layout", "shape", 1 / 17)):
        draws = [world_gen._observer_votes(rng, left, right) for _ in range(3000)]
        assert all(6 <= v <= 10 for v, _ in draws)
        voters_right = sum(v * rv for v, rv in draws) / sum(v for v, _ in draws)
        assert voters_right == pytest.approx(p_right, abs=0.015), (left, right)
    votes, right_vote = world_gen._observer_votes(rng, "colour", "shape")  # a tie
    assert 3 <= votes <= 5 and 0 < right_vote < 1


def test_each_variation_changes_exactly_its_attribute():
    rng = np.random.default_rng(0)
    positions = lambda s: np.array([(x, y) for x, y, _, _ in s.objects])
    for _ in range(200):
        ref = world_gen.random_scene(rng)
        pose, layout, colour, count, size, shape = (world_gen.change_scene(rng, ref, k)
                                                    for k in ("pose", "layout", "colour", "count", "size", "shape"))
        for v in (pose, layout, colour, count):
            assert (v.shape, v.size, v.background, v.texture) == (ref.shape, ref.size, ref.background, ref.texture)
        assert shape.shape != ref.shape and (shape.colour, shape.objects) == (ref.colour, ref.objects)
        assert (size.shape, size.colour, size.count) == (ref.shape, ref.colour, ref.count)
        assert [(x, y) for x, y, *_ in size.objects] == [(x, y) for x, y, *_ in ref.objects]
        grown = {round(r / q, 6) for (*_, r, _), (*_, q, _) in zip(size.objects, ref.objects)}
        assert grown == ({1.4} if size.size == "large" else {round(1 / 1.4, 6)})
        assert (pose.colour, pose.count) == (ref.colour, ref.count)
        assert np.abs(positions(pose) - positions(ref)).max() < 0.1
        turned = [abs((b[3] - a[3] + 180) % 360 - 180) for a, b in zip(ref.objects, pose.objects)]
        assert min(turned) >= 20 - 1e-9 and max(turned) <= 45 + 1e-9
        assert (layout.colour, layout.count) == (ref.colour, ref.count)
        assert layout.region != ref.region or ref.region == "anywhere"  # crowded groups fall back to "anywhere"
        assert np.linalg.norm(positions(layout) - positions(ref), axis=1).mean() > 0.2
        assert [(r, a) for *_, r, a in layout.objects] == [(r, a) for *_, r, a in ref.objects]
        assert colour.colour != ref.colour and colour.objects == ref.objects
        assert count.colour == ref.colour and abs(len(count.objects) - len(ref.objects)) == 1
        assert 1 <= len(count.objects) <= 4
    # and the pixels show it: on a plain background the coloured area follows the count, the colour follows colour
    ref = dataclasses.replace(world_gen.random_scene(rng, colour="red", count="two"), texture="plain")

    def coloured(scene):  # (fraction of the image the objects cover, their mean colour)
        img = np.asarray(world_gen.render_scene(scene, rng, 64), np.float32)
        obj = np.abs(img - np.array(world_gen.BACKGROUNDS[scene.background])).sum(-1) > 60
        return obj.mean(), img[obj].mean(0)

    area, rgb = coloured(ref)
    count = world_gen.change_scene(rng, ref, "count")
    assert abs(coloured(count)[0] / area - len(count.objects) / 2) < 0.3
    assert rgb[0] > 150 and np.abs(coloured(world_gen.change_scene(rng, ref, "colour"))[1] - rgb).max() > 40


def test_shards_are_img2dataset_webdataset(worlds):
    w = worlds["a"]
    assert [os.path.basename(p) for p in w.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert w.shard_pattern.endswith("shards/{00000..00002}.tar")
    n = 0
    for s, path in enumerate(w.shards):
        with tarfile.open(path) as tar:
            names = tar.getnames()
            keys = sorted({name.split(".")[0] for name in names})
            assert names == [f"{k}.{ext}" for k in keys for ext in ("json", "png", "txt")]  # grouped, key order
            for j, key in enumerate(keys):
                assert key == f"{s:05d}{j:04d}"
                with Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())) as im:
                    assert im.format == "PNG" and im.size == (32, 32)
                text = tar.extractfile(f"{key}.txt").read().decode("utf-8")
                meta = json.loads(tar.extractfile(f"{key}.json").read())
                assert meta["key"] == key and meta["caption"] == text and (meta["width"], meta["height"]) == (32, 32)
                # the caption names the colour, the shape and the count (a number word, or "a" for one)
                assert any(c in text for c in world_gen.COLOURS) and any(sh in text for sh in world_gen.SHAPES)
                assert any(n in text.split() for n in world_gen.COUNTS + ("a", "an"))
                n += 1
    assert n == 40


def test_zeroshot_folders_read_by_imagefolder(worlds):
    tasks = world_gen.synthetic_zeroshot_tasks()
    assert set(tasks) == set(worlds["a"].zeroshot) == {"shape", "colour", "count"}
    for task, (classnames, templates) in tasks.items():
        ds = ImageFolder(worlds["a"].zeroshot[task])
        assert ds.classes == classnames and len(ds) == 2 * len(classnames)  # label i is classnames[i]
        img, label = ds[len(ds) - 1]
        assert img.size == (32, 32) and label == len(classnames) - 1
        assert templates and all(t.count("{}") == 1 for t in templates)
    assert tasks["count"][0] == ["four", "one", "three", "two"] and "circle" in tasks["shape"][0]


def test_retrieval_karpathy_json(worlds):
    w = worlds["a"]
    with open(w.retrieval_json) as f:
        images = json.load(f)["images"]
    assert len(images) == 8
    for im in images:
        assert im["split"] == "test" and os.path.isfile(os.path.join(w.retrieval_root, im["filepath"], im["filename"]))
        raws = [s["raw"] for s in im["sentences"]]
        assert len(raws) == 5 == len(set(raws)) and all(r.strip() == r and "  " not in r for r in raws)


def test_never_overwrites_data_it_did_not_write(tmp_path, worlds):
    (tmp_path / "nights").mkdir()
    with pytest.raises(FileExistsError):
        world_gen.make_synthetic_world(str(tmp_path), **SMALL)
    assert (tmp_path / "nights").is_dir()
    # its own world is replaced whole: no stale shard survives a smaller rewrite
    w = world_gen.make_synthetic_world(str(tmp_path / "own"), **SMALL)
    w = world_gen.make_synthetic_world(w.root, **{**SMALL, "n_pairs": 10})
    assert sorted(os.listdir(os.path.join(w.root, "shards"))) == ["00000.tar", "00000_stats.json"]


def test_zeroshot_tasks_written_as_data_and_read_by_evaluate(tmp_path, worlds):
    """The world describes its tasks in zeroshot/tasks.json; evaluate.py reads that file and imports nothing of
    the generator, so a world written by anything else (or an edited tasks.json) is evaluated as described."""
    import ast

    import torch

    import data
    import evaluate
    from model import CLIP, CLIPConfig

    with open(os.path.join(worlds["a"].root, "zeroshot", "tasks.json")) as f:
        described = json.load(f)
    assert {t: (d["classnames"], d["templates"]) for t, d in described.items()} == world_gen.synthetic_zeroshot_tasks()
    for task, d in described.items():
        assert os.path.join(worlds["a"].root, "zeroshot", d["folder"]) == worlds["a"].zeroshot[task]
    with open(evaluate.__file__) as f:
        tree = ast.parse(f.read())
    imported = {n.name for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "synthetic_world" not in imported and "data" in imported  # (the check sees imports at all)
    # a copy of the world whose tasks.json keeps only the colour task, under another name
    root = tmp_path / "copy"
    shutil.copytree(worlds["a"].root, root)
    (root / "zeroshot" / "tasks.json").write_text(json.dumps({"hue": described["colour"]}))
    merges = str(tmp_path / "bpe.txt.gz")
    data.learn_bpe(["a photo of a red shape", "something green", "a drawing in blue"] * 3, merges, 32)
    tok = data.Tokenizer(merges)
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.tiny(vocab_size=tok.vocab_size)).eval()
    res = evaluate.synthetic_eval(model, tok, str(root), workers=0)
    assert list(res["zeroshot"]) == ["hue"] and res["zeroshot"]["hue"]["n"] == 2 * len(described["colour"]["classnames"])
    (root / "zeroshot" / "tasks.json").write_text(json.dumps({"hue": {"folder": "colour/test"}}))
    with pytest.raises(ValueError, match="tasks.json.*'hue'"):
        evaluate.synthetic_eval(model, tok, str(root), workers=0)
    os.remove(root / "zeroshot" / "tasks.json")
    assert evaluate.synthetic_eval(model, tok, str(root), workers=0)["zeroshot"]["tasks"]["skipped"] == "missing"
