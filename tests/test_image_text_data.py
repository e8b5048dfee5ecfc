"""The image-text data pipeline of data.py (tar shards, CSV): uint8 crops + per-sample photometric parameters,
at most once per epoch across ranks x workers also with uneven shards, the same global batches on any ranks x
workers (tar and CSV), batches mixed from many shards, skipped and counted bad samples, bit-exact and elastic
mid-epoch resume, and the fast decode path matching the plain one."""
import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import _image_text_fixtures as fx
import data


def epoch_batches(loader, epoch, start_step=0, positions=None):
    """The rank batches of one epoch (from start_step on) of a loader made for several epochs."""
    spe = loader.steps_per_epoch
    batches = loader.batches(start_step=epoch * spe + start_step, positions=positions)
    try:
        return [next(batches) for _ in range(spe - start_step)]
    finally:
        batches.close()


def run_epoch(loaders, epoch):
    """Batches of every rank for one epoch -> (global caption-id order, summed skip counts, steps per rank)."""
    per_rank, bad = [], Counter()
    for loader in loaders:
        batches = epoch_batches(loader, epoch)
        per_rank.append(batches)
        for b in batches:
            bad.update(b["bad"])
    steps = [len(b) for b in per_rank]
    order = [i for step in zip(*per_rank) for b in step for i in fx.ids_of(b, loaders[0].dataset.tokenizer)]
    return order, bad, steps


def tar_loaders(pattern, tok, world, workers, buffer_size, samples, batch, streams=None, image_size=32, epochs=3):
    return [data.image_text_loader(pattern, tok, image_size, batch, epochs=epochs, rank=r, world_size=world,
                                   workers=workers, seed=3, samples_per_epoch=samples, streams=streams,
                                   buffer_size=buffer_size) for r in range(world)]


def assert_same_batches(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["params"], y["params"])
        assert torch.equal(x["tokens"], y["tokens"])


@pytest.mark.filterwarnings("ignore:.*keeping the samples before it")
def test_tar_shards_each_good_sample_once_bad_ones_counted_2_ranks_x_2_workers(tmp_path):
    pattern, good = fx.broken_shards(tmp_path / "shards")
    _, tok = fx.learned_tokenizer(tmp_path)
    # the shards hold 14 samples by their headers (12 good, 2 bad; the cut one is not counted): 2 steps x global
    # batch 6 = 12 are planned. The shard order is drawn per epoch, so which streams meet the bad samples varies;
    # a stream that meets one re-reads one of its own samples ("reread") to fill its part of the batch
    loaders = tar_loaders(pattern, tok, world=2, workers=1, buffer_size=1, samples=None, batch=6, streams=2)
    assert loaders[0].samples_per_epoch == 14 and loaders[0].steps_per_epoch == 2
    orders = []
    for epoch in range(3):
        order, bad, steps = run_epoch(loaders, epoch)
        assert steps == [2, 2]  # every rank takes the same number of steps
        assert len(order) == 12 and set(order) <= good
        n_bad = sum(bad[k] for k in ("undecodable", "no caption", "truncated"))
        assert len(order) - len(set(order)) == bad["reread"]  # a repeat happens only as a counted re-read
        assert bad["reread"] <= n_bad - bad["truncated"] + 1  # (a truncated member costs the unit one sample)
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled between epochs
    assert run_epoch(loaders, 1)[0] == orders[1]  # and reproducible from (seed, epoch)


def test_batch_is_uint8_crops_with_photometric_params_equal_to_the_plain_pipeline(tmp_path):
    """A batch's images are uint8 crops and its params the sample's own draws: on the device, device_transform of
    them gives what data.train_transform gives, per image, with torch seeded by that sample's seed."""
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=2, per_shard=4)
    _, tok = fx.learned_tokenizer(tmp_path)
    [loader] = tar_loaders(pattern, tok, world=1, workers=0, buffer_size=2, samples=8, batch=4)
    batch = epoch_batches(loader, 0)[0]
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (4, 3, 32, 32)
    assert batch["params"].shape == (4, data.PHOTOMETRIC_PARAMS)
    ours = data.device_transform(batch["images"], batch["params"])
    ds = loader.dataset
    for image, i in zip(ours, fx.ids_of(batch, tok)):
        shard, index = i // 4, i % 4
        seed = data.stable_seed(3, 0, data.expand_shards(pattern).index(ds.source.shards[shard]), index, 0)
        torch.manual_seed(seed)
        ref = data.train_transform(32)(Image.open(io.BytesIO(fx.image_bytes(i))).convert("RGB"))
        # torchvision rounds to uint8 after each photometric op, we stay in float: a few uint8 steps
        assert (image - ref).abs().max() < 4 / 255 / min(data.CLIP_STD)
    plain = data.image_text_loader(pattern, tok, 32, 4, workers=0, seed=3, augment=False)
    b = epoch_batches(plain, 0)[0]
    assert b["params"] is None and b["images"].dtype == torch.uint8


def test_uneven_shards_each_sample_at_most_once_2_ranks_x_2_workers(tmp_path):
    """Shards of unequal size (img2dataset's success rate differs per shard), some with a _stats.json and some
    counted from their headers: no sample twice in an epoch, every rank the same number of steps, less than one
    global batch left out."""
    sizes, start = [7, 13, 3, 22, 9, 1, 15], 0
    for n, size in enumerate(sizes):
        fx.plain_shards(tmp_path / "shards" / str(n), n_shards=1, per_shard=size, start=start)
        if n % 2:
            (tmp_path / "shards" / str(n) / "00000_stats.json").write_text(json.dumps({"successes": size}))
        start += size
    pattern = str(tmp_path / "shards" / "{0..6}" / "00000.tar")
    _, tok = fx.learned_tokenizer(tmp_path)
    loaders = tar_loaders(pattern, tok, world=2, workers=2, buffer_size=3, samples=None, batch=8, streams=4)
    assert loaders[0].samples_per_epoch == 70 and loaders[0].steps_per_epoch == 8
    for epoch in range(2):
        order, bad, steps = run_epoch(loaders, epoch)
        assert steps == [8, 8] and not bad
        assert len(order) == len(set(order)) == 64 and set(order) <= set(range(70))  # 6 < 8 left out


@pytest.mark.filterwarnings("ignore:.*keeping the samples before it")
def test_stats_that_overcount_still_give_every_rank_the_same_steps(tmp_path):
    """A shard holding fewer usable samples than its _stats.json says (corrupt images, a truncated end): the units
    reading it re-read some of their own samples, counted, and every rank still takes the planned steps."""
    pattern, good = fx.broken_shards(tmp_path / "shards")
    for n in range(4):
        (tmp_path / "shards" / f"{n:05d}_stats.json").write_text(json.dumps({"successes": 6}))  # 24 claimed
    _, tok = fx.learned_tokenizer(tmp_path)
    loaders = tar_loaders(pattern, tok, world=2, workers=2, buffer_size=2, samples=None, batch=8, streams=4)
    assert loaders[0].steps_per_epoch == 3
    order, bad, steps = run_epoch(loaders, 0)
    assert steps == [3, 3] and len(order) == 24 and set(order) <= good
    assert bad["reread"] == len(order) - len(set(order)) > 0


def test_a_batch_mixes_many_shards(tmp_path):
    """16 shards of 1,250 samples whose captions name their shard, 2 workers, batch 1,024: each batch spans at
    least 8 shards."""
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=16, per_shard=1250, image_size=(8, 8), stats=True)
    _, tok = fx.learned_tokenizer(tmp_path)
    [loader] = tar_loaders(pattern, tok, world=1, workers=2, buffer_size=data.SHUFFLE_BUFFER, samples=None,
                           batch=1024, image_size=8, epochs=1)
    assert loader.steps_per_epoch == 19
    batches = loader.batches()
    for _ in range(3):
        spread = len({i // 1250 for i in fx.ids_of(next(batches), tok)})
        assert spread >= 8, spread
    batches.close()


def test_tar_mid_epoch_resume_is_bit_exact(tmp_path):
    """Resuming at a step with the reported stream positions gives exactly the remaining batches (images, params,
    tokens) of the uninterrupted epoch, and does not count the replayed samples' skips again."""
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=3, per_shard=7)
    _, tok = fx.learned_tokenizer(tmp_path)
    [loader] = tar_loaders(pattern, tok, world=1, workers=2, buffer_size=3, samples=None, batch=6, streams=6)
    full = epoch_batches(loader, 1)
    assert len(full) == 3
    positions = {}
    for b in full[:1]:
        positions.update(b["positions"])
    assert_same_batches(full[1:], epoch_batches(loader, 1, start_step=1, positions=positions))


def test_tar_unknown_size_and_missing_shards_are_clear_errors(tmp_path):
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    _, tok = fx.learned_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no full batch of 8"):
        data.image_text_loader(pattern, tok, 32, 8)
    with pytest.raises(FileNotFoundError):
        data.image_text_loader(str(tmp_path / "nope/{0..3}.tar"), tok, 32, 2, samples_per_epoch=4)
    # one shard may feed several workers: they read disjoint parts of it
    [loader] = tar_loaders(pattern, tok, world=1, workers=2, buffer_size=1, samples=4, batch=2)
    assert sorted(run_epoch([loader], 0)[0]) == [0, 1, 2, 3]


def test_img2dataset_stats_give_the_epoch_size(tmp_path):
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=2, per_shard=3)
    for n in range(2):
        (tmp_path / "shards" / f"{n:05d}_stats.json").write_text('{"successes": 3, "failed_to_download": 1}')
    _, tok = fx.learned_tokenizer(tmp_path)
    loader = data.image_text_loader(pattern, tok, 32, 2, workers=0)
    assert loader.samples_per_epoch == 6 and loader.steps_per_epoch == 3
    with pytest.warns(UserWarning, match="at most once"):
        loader = data.image_text_loader(pattern, tok, 32, 2, workers=0, samples_per_epoch=100)
    assert loader.samples_per_epoch == 6


def test_webdataset_tarwriter_shards_read_with_nothing_skipped(tmp_path):
    """Shards written by the webdataset library itself (jpg, png, webp; txt; json): every sample read, none
    skipped, the images decoded as the plain PIL pipeline decodes them."""
    wds = pytest.importorskip("webdataset")
    (tmp_path / "shards").mkdir()
    for n, fmt in enumerate(["JPEG", "PNG", "WEBP"]):
        with wds.TarWriter(str(tmp_path / "shards" / f"{n:05d}.tar")) as sink:
            for i in range(n * 4, n * 4 + 4):
                ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
                sink.write({"__key__": f"{i:09d}", ext: fx.image_bytes(i, fmt), "txt": fx.caption(i),
                            "json": {"key": i}})
    _, tok = fx.learned_tokenizer(tmp_path)
    loaders = tar_loaders(str(tmp_path / "shards" / "{00000..00002}.tar"), tok, world=1, workers=2, buffer_size=4,
                          samples=None, batch=4)
    order, bad, steps = run_epoch(loaders, 0)
    assert sorted(order) == list(range(12)) and not bad and steps == [3]


@pytest.mark.filterwarnings("ignore:.*without a caption")
@pytest.mark.parametrize("sep", [",", "\t"])
def test_csv_each_good_sample_once_and_global_order_independent_of_ranks(tmp_path, sep):
    path = fx.write_csv(tmp_path, n_good=8, sep=sep)
    _, tok = fx.learned_tokenizer(tmp_path)
    # 9 rows with a caption (8 good + 1 corrupt image): 2 steps of 4 read 8 of them, in 4 streams of 2; a stream
    # that meets the corrupt row re-reads one of its own (counted), so each good row is read at most once otherwise
    def loaders(world, workers):
        return [data.image_text_loader(path, tok, 32, 4, epochs=3, rank=r, world_size=world, workers=workers,
                                       seed=1) for r in range(world)]
    two, one = loaders(2, 2), loaders(1, 0)
    assert two[0].dataset.source.no_caption == 1 and two[0].steps_per_epoch == 2 and two[0].workers == 2
    n_undecodable, orders = 0, []
    for epoch in range(3):
        order, bad, steps = run_epoch(two, epoch)
        assert steps == [2, 2] and set(order) <= set(range(8))
        assert len(set(order)) + bad.get(data.REREAD, 0) == 8 == len(order)
        n_undecodable += bad.get("undecodable", 0)
        orders.append(order)
        # one process sees the same global batches, images included (augmentation seeded by row and epoch)
        single = epoch_batches(one[0], epoch)
        for k, b in enumerate(single):
            halves = [epoch_batches(loader, epoch)[k] for loader in two]
            assert torch.equal(b["tokens"], torch.cat([h["tokens"] for h in halves]))
            for key in ("images", "params"):
                assert torch.equal(b[key], torch.cat([h[key] for h in halves]))
    assert n_undecodable >= 1  # the corrupt row was drawn in at least one of the 3 epochs and counted
    assert len({tuple(o) for o in orders}) > 1  # each epoch its own row order


def test_csv_rows_resume_mid_epoch_on_another_number_of_ranks(tmp_path):
    """A CSV is one shard read in a row order drawn from (seed, epoch): each epoch reads every row once, and the
    positions a 1-rank run wrote at step 2 continue on 2 ranks x 1 worker with the unbroken run's batches."""
    path = fx.write_csv(tmp_path, n_good=24, extra_bad=False)
    _, tok = fx.learned_tokenizer(tmp_path)
    [one] = [data.image_text_loader(path, tok, 32, 4, epochs=2, workers=1, seed=2)]
    full = epoch_batches(one, 0)
    assert sorted(i for b in full for i in fx.ids_of(b, tok)) == list(range(24))
    positions = {**full[0]["positions"], **full[1]["positions"]}
    two = [data.image_text_loader(path, tok, 32, 4, epochs=2, rank=r, world_size=2, workers=1, seed=2)
           for r in range(2)]
    halves = [epoch_batches(loader, 0, start_step=2, positions=positions) for loader in two]
    for b, parts in zip(full[2:], zip(*halves), strict=True):
        assert torch.equal(b["tokens"], torch.cat([h["tokens"] for h in parts]))
        assert torch.equal(b["images"], torch.cat([h["images"] for h in parts]))


def test_csv_missing_column_is_a_clear_error(tmp_path):
    path = fx.write_csv(tmp_path, n_good=4, extra_bad=False)
    _, tok = fx.learned_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no column.*caption"):
        data.image_text_loader(path, tok, 32, 2, csv_caption_key="caption")


def test_expand_shards():
    assert data.expand_shards("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert data.expand_shards("{a,b}/{0..1}.tar::c.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar", "c.tar"]
    assert data.expand_shards(["x.tar", "y/{1..2}.tar"]) == ["x.tar", "y/1.tar", "y/2.tar"]


def test_shuffle_buffer_is_a_seeded_permutation():
    a = list(data.shuffle_buffer(range(100), 10, random.Random(0)))
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == list(data.shuffle_buffer(range(100), 10, random.Random(0)))


# ---- the fast decode path computes the same transform


def photo_jpeg(w=300, h=240, quality=95):
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((12, 15, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_image_decoder_matches_plain_decode_and_transform():
    """Same seed -> same crop and flip as PIL-decode + train_crop_transform. Without a JPEG draft (PNG, small
    crops) the uint8 images agree exactly; with one (large crops of a large JPEG), up to the difference between
    DCT-domain and bicubic downscaling."""
    transform = data.train_crop_transform(64)
    decoder = data.ImageDecoder(transform)
    jpeg = photo_jpeg()
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, "PNG")
    drafted = 0
    for seed in range(12):
        for payload in (png.getvalue(), jpeg):
            torch.manual_seed(seed)
            ref = transform(Image.open(io.BytesIO(payload)).convert("RGB"))
            torch.manual_seed(seed)
            out = decoder(payload)
            assert out.shape == ref.shape == (3, 64, 64)
            assert out.dtype == ref.dtype == torch.uint8
            diff = (out.float() - ref.float()).abs()
            if diff.max() == 0:
                continue
            drafted += 1
            assert payload is jpeg and diff.mean() < 3  # uint8 levels
    assert drafted > 0  # some crops of the 300x240 JPEG were large enough to decode at half scale


def test_image_decoder_eval_transform_and_undecodable():
    decoder = data.ImageDecoder(data.eval_crop_transform(64))
    jpeg = photo_jpeg()
    ref = data.eval_crop_transform(64)(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert decoder(jpeg).shape == ref.shape and (decoder(jpeg).float() - ref.float()).abs().mean() < 3
    with pytest.raises(Exception):
        decoder(jpeg[:200])  # truncated
    # an image already at the output size skips Resize and CenterCrop, which would leave it as it is: the same
    # tensor as the whole transform, exactly, for square and non-square, JPEG and PNG, RGB and grayscale images
    for w, h, mode in ((64, 64, "RGB"), (64, 64, "L"), (64, 80, "RGB"), (63, 63, "RGB")):
        for fmt in ("JPEG", "PNG"):
            buf = io.BytesIO()
            Image.open(io.BytesIO(photo_jpeg(w, h))).convert(mode).save(buf, fmt)
            ref = data.eval_crop_transform(64)(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            out = decoder(buf.getvalue())
            assert type(out) is type(ref) and out.dtype == ref.dtype and torch.equal(out, ref), (w, h, mode, fmt)
    assert decoder.unchanged_side == 64 and data.ImageDecoder(data.train_crop_transform(64)).unchanged_side is None


# ---- the sample order does not depend on the hardware (canonical streams)


def uneven_shards(root, sizes=(17, 33, 8, 41, 12, 3, 26)):
    """Shards of unequal sizes (img2dataset's success rate differs per shard), half with a _stats.json."""
    start = 0
    for n, size in enumerate(sizes):
        fx.plain_shards(root / str(n), n_shards=1, per_shard=size, start=start, stats=n % 2 == 1)
        start += size
    return str(root / ("{0..%d}" % (len(sizes) - 1)) / "00000.tar")


def global_batches(pattern, tok, world, workers, start_step=0, positions=None, streams=12, epochs=2, seed=3):
    """Every global batch of the run from start_step on: the ranks' batches joined in rank order."""
    loaders = [data.image_text_loader(pattern, tok, 32, 24, epochs=epochs, rank=r, world_size=world,
                                      workers=workers, seed=seed, streams=streams, buffer_size=5)
               for r in range(world)]
    per_rank = []
    for loader in loaders:
        batches = loader.batches(start_step=start_step, positions=positions)
        per_rank.append(list(batches))
    out = []
    for step in zip(*per_rank):
        out.append({k: torch.cat([b[k] for b in step]) for k in ("images", "params", "tokens")})
        out[-1]["positions"] = {s: p for b in step for s, p in b["positions"].items()}
    return out


def test_global_batches_are_the_same_on_any_ranks_x_workers(tmp_path):
    """On uneven shards, each global batch (its samples, in order, and their augmentation draws) is the same for
    1 rank x 1 worker, 1 x 3, 2 x 2 and 3 x 1, in every epoch, with each sample at most once per epoch."""
    pattern = uneven_shards(tmp_path / "shards")
    _, tok = fx.learned_tokenizer(tmp_path)
    reference = global_batches(pattern, tok, world=1, workers=1)
    assert len(reference) == 2 * 5  # 140 samples: 5 steps of 24 per epoch
    for epoch in range(2):
        ids = [i for b in reference[epoch * 5:(epoch + 1) * 5] for i in fx.ids_of(b, tok)]
        assert len(ids) == len(set(ids)) == 120
    for world, workers in ((1, 3), (2, 2), (3, 1)):
        assert_same_batches(reference, global_batches(pattern, tok, world=world, workers=workers))
    other_seed = global_batches(pattern, tok, world=1, workers=1, seed=4)
    assert fx.ids_of(other_seed[0], tok) != fx.ids_of(reference[0], tok)  # the comparison can fail


def test_a_run_stopped_on_2_ranks_resumes_on_1_with_the_same_batches(tmp_path):
    """Elastic resume: the stream positions written by 2 ranks x 2 workers after step 2 continue on 1 rank x 3
    workers (and 3 x 1) with exactly the batches the unbroken run had, to the end of the run."""
    pattern = uneven_shards(tmp_path / "shards")
    _, tok = fx.learned_tokenizer(tmp_path)
    two = global_batches(pattern, tok, world=2, workers=2)
    positions = {}
    for b in two[:2]:
        positions.update(b["positions"])
    assert sorted(positions) == list(range(12))
    assert_same_batches(two[2:], global_batches(pattern, tok, world=1, workers=3, start_step=2, positions=positions))
    assert_same_batches(two[2:], global_batches(pattern, tok, world=3, workers=1, start_step=2, positions=positions))


def test_streams_that_do_not_share_out_are_a_clear_error(tmp_path):
    pattern = uneven_shards(tmp_path / "shards")
    _, tok = fx.learned_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"5 ranks cannot share 12 data streams evenly: run on 4 or 6 ranks, or pass "
                                         r"--data-streams 10"):
        data.image_text_loader(pattern, tok, 32, 120, world_size=5, rank=0, streams=12, samples_per_epoch=120)
    with pytest.raises(ValueError, match="must divide the global batch 24"):
        data.image_text_loader(pattern, tok, 32, 24, streams=7)
    with pytest.warns(UserWarning, match="4 workers cannot share this rank's 6 data streams evenly: using 3"):
        loader = data.image_text_loader(pattern, tok, 32, 24, world_size=2, workers=4, streams=12)
    assert loader.workers == 3


def test_shards_without_usable_samples_are_a_clear_error_not_a_hang(tmp_path):
    """Captions stored as .caption (not .txt): every sample is a counted skip, and the stream says so after two
    passes instead of re-reading itself for ever."""
    (tmp_path / "shards").mkdir()
    members = [m for i in range(8) for m in ((f"{i:09d}.jpg", fx.image_bytes(i)),
                                             (f"{i:09d}.caption", fx.caption(i).encode()))]
    fx.write_shard(str(tmp_path / "shards" / "00000.tar"), members)
    _, tok = fx.learned_tokenizer(tmp_path)
    loader = data.image_text_loader(str(tmp_path / "shards" / "00000.tar"), tok, 32, 4, workers=0, streams=1)
    with pytest.raises(ValueError, match=r"no usable sample.*\['caption', 'jpg'\].*txt caption"):
        next(iter(loader.batches()))


def test_a_stream_with_one_usable_sample_in_many_fills_its_batches(tmp_path):
    """11 of a stream's 12 samples are corrupt: every step re-reads the one good sample (counted), however many
    corrupt ones lie between two reads of it; no 'no usable sample' error."""
    (tmp_path / "shards").mkdir()
    members = [m for i in range(12) for m in ((f"{i:09d}.jpg", fx.image_bytes(i) if i == 5 else b"not a jpeg"),
                                              (f"{i:09d}.txt", fx.caption(i).encode()))]
    fx.write_shard(str(tmp_path / "shards" / "00000.tar"), members)
    _, tok = fx.learned_tokenizer(tmp_path)
    loader = data.image_text_loader(str(tmp_path / "shards" / "00000.tar"), tok, 32, 4, workers=0, streams=1)
    batches = list(loader.batches())
    assert len(batches) == 3 and all(fx.ids_of(b, tok) == [5] * 4 for b in batches)
    bad = sum((Counter(b["bad"]) for b in batches), Counter())
    assert bad[data.REREAD] == 11 and bad[data.UNDECODABLE] >= 11


def test_a_stream_whose_whole_range_is_unreadable_reads_the_next_streams(tmp_path):
    """Stats that count 8 samples in shards holding 4: the streams whose range is a shard's missing half read the
    next stream's samples (counted as re-reads), on every setup alike; a plan with nothing readable is an error."""
    plan = [[(0, 0, 2)], [(1, 0, 2)]]
    read = lambda piece: [] if piece[0] == 0 else [("shard 1", i) for i in range(*piece[1:])]  # noqa: E731
    entries = data.stream_samples(plan, 0, read, seed=0, epoch=0, buffer_size=1)
    assert sorted(next(entries) for _ in range(2)) == [(1, ("shard 1", 0)), (1, ("shard 1", 1))]
    with pytest.raises(RuntimeError, match="any of the 2 data streams"):
        next(data.stream_samples(plan, 0, lambda piece: [], seed=0, epoch=0, buffer_size=1))
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=2, per_shard=4)
    for n in range(2):
        (tmp_path / "shards" / f"{n:05d}_stats.json").write_text('{"successes": 8}')
    _, tok = fx.learned_tokenizer(tmp_path)
    one = tar_loaders(pattern, tok, world=1, workers=0, buffer_size=2, samples=None, batch=4, streams=4, epochs=2)
    two = tar_loaders(pattern, tok, world=2, workers=1, buffer_size=2, samples=None, batch=4, streams=4, epochs=2)
    for epoch in range(2):
        order, bad, steps = run_epoch(one, epoch)
        assert steps == [4] and set(order) <= set(range(8)) and bad[data.REREAD] >= 8
        assert run_epoch(two, epoch)[0] == order
