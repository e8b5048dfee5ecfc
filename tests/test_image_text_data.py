"""The image-text data pipeline of data.py (tar shards, CSV): exactly-once epochs across ranks x workers, skipped and
counted bad samples, reshuffling, rank-independent CSV order, and the fast decode path matching the plain one."""
import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import _image_text_fixtures as fx
import data


def run_epoch(loaders, epoch):
    """Batches of every rank for one epoch -> (global caption-id order, summed skip counts, steps per rank)."""
    per_rank, bad = [], Counter()
    for loader in loaders:
        batches = list(loader.epoch(epoch))
        per_rank.append(batches)
        for b in batches:
            bad.update(b["bad"])
    steps = [len(b) for b in per_rank]
    order = [i for step in zip(*per_rank) for b in step for i in fx.ids_of(b, loaders[0].dataset.tokenizer)]
    return order, bad, steps


def tar_loaders(pattern, tok, world, workers, buffer_size, samples, batch):
    return [data.image_text_loader(pattern, tok, data.train_transform(32), batch, rank=r, world_size=world,
                                   workers=workers, seed=3, samples_per_epoch=samples, buffer_size=buffer_size)
            for r in range(world)]


@pytest.mark.filterwarnings("ignore:.*unexpected end of data")
def test_tar_shards_each_good_sample_once_bad_ones_counted_2_ranks_x_2_workers(tmp_path):
    pattern, good = fx.broken_shards(tmp_path / "shards")
    _, tok = fx.learned_tokenizer(tmp_path)
    # a one-sample buffer reads each shard in order, so the bad samples (each at a shard's start or end) are
    # certainly reached; 12 good samples = 2 steps x global batch 6 = one batch of 3 per worker
    loaders = tar_loaders(pattern, tok, world=2, workers=2, buffer_size=1, samples=12, batch=6)
    orders = []
    for epoch in range(2):
        order, bad, steps = run_epoch(loaders, epoch)
        assert steps == [2, 2]  # every rank takes the same number of steps
        assert sorted(order) == sorted(good)  # each good sample exactly once
        assert bad == {"undecodable": 1, "no caption": 1, "truncated": 1}
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled between epochs (shard order and shard -> worker assignment)
    assert run_epoch(loaders, 1)[0] == orders[1]  # and reproducible from (seed, epoch)


def test_tar_shuffle_buffer_keeps_exactly_once_and_reshuffles(tmp_path):
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=4, per_shard=6)
    _, tok = fx.learned_tokenizer(tmp_path)
    loaders = tar_loaders(pattern, tok, world=2, workers=2, buffer_size=4, samples=24, batch=4)
    orders = [run_epoch(loaders, e)[0] for e in range(2)]
    for order in orders:
        assert sorted(order) == list(range(24))
    assert orders[0] != orders[1]


def test_tar_epoch_longer_than_shards_cycles_and_resumes_mid_epoch(tmp_path):
    """An epoch defined by a sample count bigger than a worker's shards cycles through them again; resuming at a
    step with the reported worker positions gives exactly the remaining batches of the uninterrupted epoch."""
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=2, per_shard=5)
    _, tok = fx.learned_tokenizer(tmp_path)
    [loader] = tar_loaders(pattern, tok, world=1, workers=2, buffer_size=3, samples=21, batch=3)
    full = list(loader.epoch(1))
    assert len(full) == 7
    ids = [i for b in full for i in fx.ids_of(b, tok)]
    assert set(ids) == set(range(10)) and len(ids) == 21
    positions = {}
    for b in full[:3]:
        positions[b["worker"]] = b["pos"]
    rest = list(loader.epoch(1, start_step=3, positions=positions))
    assert len(rest) == 4
    for a, b in zip(full[3:], rest):
        torch.testing.assert_close(a["images"], b["images"], rtol=0, atol=0)
        assert torch.equal(a["tokens"], b["tokens"])


def test_tar_too_few_shards_and_unknown_size_are_clear_errors(tmp_path):
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    _, tok = fx.learned_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="train-num-samples"):
        data.image_text_loader(pattern, tok, data.train_transform(32), 2)
    [loader] = tar_loaders(pattern, tok, world=1, workers=2, buffer_size=1, samples=4, batch=2)
    with pytest.raises(ValueError, match="1 shards cannot be dealt to 1 ranks x 2 workers"):
        list(loader.epoch(0))
    with pytest.raises(FileNotFoundError):
        data.image_text_loader(str(tmp_path / "nope/{0..3}.tar"), tok, data.train_transform(32), 2, samples_per_epoch=4)


def test_img2dataset_stats_give_the_epoch_size(tmp_path):
    pattern = fx.plain_shards(tmp_path / "shards", n_shards=2, per_shard=3)
    for n in range(2):
        (tmp_path / "shards" / f"{n:05d}_stats.json").write_text('{"successes": 3, "failed_to_download": 1}')
    _, tok = fx.learned_tokenizer(tmp_path)
    loader = data.image_text_loader(pattern, tok, data.train_transform(32), 2, workers=0)
    assert loader.samples_per_epoch == 6 and loader.steps_per_epoch == 3


@pytest.mark.filterwarnings("ignore:.*without a caption")
@pytest.mark.parametrize("sep", [",", "\t"])
def test_csv_each_good_sample_once_and_global_order_independent_of_ranks(tmp_path, sep):
    path = fx.write_csv(tmp_path, n_good=8, sep=sep)
    _, tok = fx.learned_tokenizer(tmp_path)
    # 9 rows with a caption (8 good + 1 corrupt image): 2 steps of 4 use 8 of them, 1 is the epoch's spare
    def loaders(world, workers):
        return [data.image_text_loader(path, tok, data.train_transform(32), 4, rank=r, world_size=world,
                                       workers=workers, seed=1) for r in range(world)]
    two, one = loaders(2, 2), loaders(1, 0)
    assert two[0].dataset.no_caption == 1 and two[0].steps_per_epoch == 2
    n_undecodable = 0
    for epoch in range(3):
        order, bad, steps = run_epoch(two, epoch)
        assert steps == [2, 2]
        assert sorted(order) == list(range(8))  # the corrupt image was replaced by the spare row
        n_undecodable += bad.get("undecodable", 0)
        # one process sees the same global batches, images included (augmentation seeded by position)
        single = list(one[0].epoch(epoch))
        for k, b in enumerate(single):
            halves = [list(loader.epoch(epoch))[k] for loader in two]
            assert torch.equal(b["tokens"], torch.cat([h["tokens"] for h in halves]))
            torch.testing.assert_close(b["images"], torch.cat([h["images"] for h in halves]), rtol=0, atol=0)
    assert n_undecodable >= 1  # the corrupt row was drawn in at least one of the 3 epochs and counted


def test_csv_missing_column_is_a_clear_error(tmp_path):
    path = fx.write_csv(tmp_path, n_good=4, extra_bad=False)
    _, tok = fx.learned_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no column.*caption"):
        data.image_text_loader(path, tok, data.train_transform(32), 2, csv_caption_key="caption")


def test_global_batch_sampler_slices_are_contiguous_and_resume_at_a_step():
    s1 = data.GlobalBatchSampler(10, 4, 2, seed=5)
    s2 = [data.GlobalBatchSampler(10, 4, 2, rank=r, world_size=2, seed=5) for r in range(2)]
    full = list(s1)
    assert [a + b for a, b in zip(*map(list, s2))] == full
    s1.set_epoch(0, start_step=1)
    assert list(s1) == full[1:]
    s1.set_epoch(1)
    assert list(s1) != full


def test_expand_shards():
    assert data.expand_shards("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert data.expand_shards("{a,b}/{0..1}.tar::c.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar", "c.tar"]
    assert data.expand_shards(["x.tar", "y/{1..2}.tar"]) == ["x.tar", "y/1.tar", "y/2.tar"]


def test_shuffle_buffer_is_a_seeded_permutation():
    a = list(data.shuffle_buffer(range(100), 10, random.Random(0)))
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == list(data.shuffle_buffer(range(100), 10, random.Random(0)))


# ---- the fast decode path computes the same transform


def test_separable_blur_equals_torchvision_blur():
    x = torch.randint(0, 256, (2, 3, 37, 45), dtype=torch.uint8)
    for k in (3, 23):
        ref, fast = v2.GaussianBlur(k, sigma=(0.1, 2.0)), data.SeparableGaussianBlur(k, sigma=(0.1, 2.0))
        torch.manual_seed(0)
        a = ref(x)
        torch.manual_seed(0)
        b = fast(x)
        assert (a.int() - b.int()).abs().max() <= 1 and a.dtype == b.dtype  # float rounding before uint8 rounding
        xf = x.float() / 255
        torch.manual_seed(1)
        a = ref(xf)
        torch.manual_seed(1)
        torch.testing.assert_close(fast(xf), a, atol=1e-5, rtol=0)


def photo_jpeg(w=300, h=240, quality=95):
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((12, 15, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_image_decoder_matches_plain_decode_and_transform():
    """Same seed -> same crop, flip, jitter and blur as PIL-decode + train_transform. Without a JPEG draft (PNG,
    small crops) the images agree up to the blur's float rounding; with one (large crops of a large JPEG), up to
    the difference between DCT-domain and bicubic downscaling."""
    transform = data.train_transform(64)
    decoder = data.ImageDecoder(transform)
    jpeg = photo_jpeg()
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, "PNG")
    one_level = 1 / 255 / min(data.CLIP_STD) + 1e-6  # one uint8 step after normalisation
    drafted = 0
    for seed in range(12):
        for payload in (png.getvalue(), jpeg):
            torch.manual_seed(seed)
            ref = transform(Image.open(io.BytesIO(payload)).convert("RGB"))
            torch.manual_seed(seed)
            out = decoder(payload)
            assert out.shape == ref.shape == (3, 64, 64)
            diff = (out - ref).abs()
            if diff.max() <= 2 * one_level:
                continue
            drafted += 1
            assert payload is jpeg and diff.mean() < 0.05
    assert drafted > 0  # some crops of the 300x240 JPEG were large enough to decode at half scale


def test_image_decoder_eval_transform_and_undecodable():
    decoder = data.ImageDecoder(data.eval_transform(64))
    jpeg = photo_jpeg()
    ref = data.eval_transform(64)(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert decoder(jpeg).shape == ref.shape and (decoder(jpeg) - ref).abs().mean() < 0.05
    with pytest.raises(Exception):
        decoder(jpeg[:200])  # truncated
