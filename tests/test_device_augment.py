"""The batched photometric augmentation of data.py (train_transform's colour jitter, grayscale and blur, run on the
training device with per-sample parameters) against torchvision's own per-image transforms and their random draws.

Tolerances. On float images our ops and torchvision's compute the same formulas in a different float order, so they
agree to ~1e-6; we allow FLOAT_TOL = 1e-5. torchvision's pipeline in train_transform runs on uint8 images and
quantises after every op: the jitter ops and grayscale truncate (error in (-1/255, 0]), the blur rounds (|error| <=
1/2 / 255), contrast and saturation floor the luma they blend towards. We stay in float. With up to six quantised ops
(four jitter ops, grayscale, blur), each later jitter op scaling earlier errors by at most its factor (<= 1.4) on
the pixel plus (1 - factor) times a luma of errors (<= 0.4 more), the per-pixel gap is < 6 * 1.8 / 255; we allow
U8_MAX_TOL = 10 / 255 and, since truncation biases every op the same way by ~1/2 / 255, a mean gap of
U8_MEAN_TOL = 3 / 255 per image. (Measured over 200 seeds on the images below: max 6.1 / 255, mean 1.2 / 255.)"""
import itertools

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

import data

FLOAT_TOL = 1e-5
U8_MAX_TOL, U8_MEAN_TOL = 10 / 255, 3 / 255


def real_looking(n, size, seed=0):
    """uint8 [n, 3, size, size]: smooth colour gradients plus noise, with a flat grey patch (hue undefined) and
    patches of pure primaries and of r = g > b (ties in the HSV max)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for i in range(n):
        a, b, c = torch.rand(3, generator=g)
        base = torch.stack([(a * xx + (1 - a) * yy), (b * yy + (1 - b) * (1 - xx)), (c * xx * yy + (1 - c) * 0.5)])
        noise = torch.rand(3, size, size, generator=g)
        img = ((0.8 - 0.5 * (i % 2)) * base + (0.2 + 0.5 * (i % 2)) * noise).clamp(0, 1)
        q = size // 4
        img[:, :q, :q] = 0.5  # grey
        img[:, :q, q:2 * q] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
        img[:, q:2 * q, :q] = torch.tensor([0.7, 0.7, 0.2]).view(3, 1, 1)
        out.append((img * 255).round().to(torch.uint8))
    return torch.stack(out)


def as_float(images):
    return images.float() / 255


def assert_close(a, b, tol):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol, f"max |difference| {err:.3g} > {tol:.3g}"


# --- each batched op against torchvision's per-image functional op, float input


@pytest.mark.parametrize("op, fn, lo, hi", [(0, F.adjust_brightness, 0.0, 2.0), (1, F.adjust_contrast, 0.0, 2.0),
                                            (2, F.adjust_saturation, 0.0, 2.0)])
def test_blend_ops_match_torchvision(op, fn, lo, hi):
    x = as_float(real_looking(6, 40))
    factors = torch.empty(6, 3).uniform_(lo, hi)
    factors[0, op], factors[1, op] = 1.4, 0.6  # the ends of train_transform's range
    ours = data._blend_op(x, op=torch.full((6,), op), factors=factors, active=torch.ones(6, dtype=torch.bool))
    ref = torch.stack([fn(x[i], float(factors[i, op])) for i in range(6)])
    assert_close(ours, ref, FLOAT_TOL)
    assert (ours - x).abs().max() > 0.1  # the op did something
    off = data._blend_op(x, op=torch.full((6,), op), factors=factors, active=torch.zeros(6, dtype=torch.bool))
    assert torch.equal(off, x)  # inactive samples pass through bit for bit


def test_hue_matches_torchvision():
    x = as_float(real_looking(8, 40))
    hue = torch.tensor([-0.5, -0.1, -0.03, 0.0, 0.02, 0.1, 0.37, 0.5])
    ours = data._adjust_hue(x, hue)
    ref = torch.stack([F.adjust_hue(x[i], float(hue[i])) for i in range(8)])
    assert_close(ours, ref, FLOAT_TOL)
    assert (ours[0] - x[0]).abs().max() > 0.5


def test_grayscale_matches_torchvision():
    x = as_float(real_looking(4, 32))
    assert_close(data._grayscale(x).expand_as(x), torch.stack([F.rgb_to_grayscale(x[i], 3) for i in range(4)]),
                 FLOAT_TOL)


@pytest.mark.parametrize("size", [32, 224])
def test_blur_matches_torchvision(size):
    n = 5 if size == 32 else 2
    x = as_float(real_looking(n, size))
    k = 2 * (size // 20) + 1
    sigma = torch.tensor([0.1, 2.0, 0.7, 1.3, 0.35])[:n]
    ours = data._gaussian_blur(x, kernel_size=k, sigma=sigma)
    ref = torch.stack([F.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) for i in range(n)])
    assert_close(ours, ref, FLOAT_TOL)
    assert (ours[1] - x[1]).abs().max() > 0.05


def test_jitter_order_is_honoured():
    """All 24 orders of the four jitter ops against torchvision's functional ops applied in that order. With strong
    factors and clipping the order matters, so a wrong order would fail."""
    x = as_float(real_looking(1, 32))
    fns = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    factors = [1.4, 0.6, 1.4, 0.1]
    orders = torch.stack([torch.tensor(o) for o in itertools.permutations(range(4))])
    params = torch.tensor([1.0] + factors + [0.0] * 7).repeat(24, 1)
    params[:, 5:9] = orders.float()
    ours = data.photometric_augment(real_looking(1, 32).expand(24, -1, -1, -1), params)
    for i, order in enumerate(orders.tolist()):
        ref = x[0]
        for op in order:
            ref = fns[op](ref, factors[op])
        assert_close(ours[i], ref, FLOAT_TOL)
    spread = (ours - ours.mean(0)).abs().amax(dim=(1, 2, 3))
    assert spread.max() > 0.02  # the orders really give different images


def test_per_sample_params_equal_each_image_alone():
    images = real_looking(12, 40, seed=3)
    g = torch.Generator().manual_seed(5)
    params = torch.stack([data.draw_photometric_params(g) for _ in range(12)])
    assert len({tuple(p.tolist()) for p in params}) == 12
    batch = data.photometric_augment(images, params)
    alone = torch.cat([data.photometric_augment(images[i:i + 1], params[i:i + 1]) for i in range(12)])
    assert_close(batch, alone, 1e-6)
    assert batch.dtype == torch.float32 and 0 <= batch.min() and batch.max() <= 1


# --- the random draws: the same as torchvision's from a generator in the same state


def photometric_steps(image_size):
    """train_transform's photometric steps (RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur))."""
    steps = data.train_transform(image_size).transforms[3:6]
    assert [type(t) for t in steps] == [v2.RandomApply, v2.RandomGrayscale, v2.RandomApply]
    return v2.Compose(steps)


def test_draws_equal_torchvisions(monkeypatch):
    """The parameters torchvision's own make_params return under torch.manual_seed(s) equal
    draw_photometric_params(torch.Generator().manual_seed(s)) exactly, over seeds that cover every on/off case."""
    drawn = {}
    for cls in (v2.ColorJitter, v2.RandomGrayscale, v2.GaussianBlur):
        def record(self, flat_inputs, make_params=cls.make_params, name=cls.__name__):
            drawn[name] = make_params(self, flat_inputs)
            return drawn[name]
        monkeypatch.setattr(cls, "make_params", record)
    steps, image = photometric_steps(32), tv_tensors.Image(real_looking(1, 32)[0])
    seen = set()
    for s in range(40):
        drawn.clear()
        torch.manual_seed(s)
        steps(image)
        p = data.draw_photometric_params(torch.Generator().manual_seed(s))
        jitter = drawn.get("ColorJitter")
        assert bool(p[0]) == (jitter is not None)
        if jitter is not None:
            assert p[5:9].tolist() == jitter["fn_idx"].tolist()
            factors = [jitter[k] for k in ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")]
            assert p[1:5].tolist() == factors  # float32 draws, exactly
        assert bool(p[9]) == ("RandomGrayscale" in drawn)
        assert bool(p[10]) == ("GaussianBlur" in drawn)
        if "GaussianBlur" in drawn:
            assert p[11].item() == drawn["GaussianBlur"]["sigma"][0]
        seen.add((bool(p[0]), bool(p[9]), bool(p[10])))
    assert {j for j, _, _ in seen} == {True, False} and {g for _, g, _ in seen} == {True, False}
    assert {b for _, _, b in seen} == {True, False}


def test_augment_equals_torchvision_pipeline_on_float_images():
    """Same seed: torchvision's photometric steps on the float image == photometric_augment with the drawn params.
    (Float input, so torchvision does not quantise: this checks draws, order and ops together, tightly.)"""
    images = real_looking(4, 40, seed=1)
    steps = photometric_steps(40)
    for s in range(24):
        img = images[s % 4]
        torch.manual_seed(s)
        ref = steps(tv_tensors.Image(as_float(img)))
        p = data.draw_photometric_params(torch.Generator().manual_seed(s))
        assert_close(data.photometric_augment(img[None], p[None])[0], ref.as_subclass(torch.Tensor), FLOAT_TOL)


def test_uint8_rounding_gap_to_torchvision_pipeline():
    """torchvision's uint8 pipeline (train_transform's photometric steps on the uint8 crop) vs ours in float: the
    gap is only its per-op quantisation (module docstring), and far below the effect of other parameters."""
    images = real_looking(4, 48, seed=2)
    steps = photometric_steps(48)
    means, other = [], []
    for s in range(40):
        img = images[s % 4]
        torch.manual_seed(s)
        ref = as_float(steps(tv_tensors.Image(img)).as_subclass(torch.Tensor))
        same, wrong = [data.draw_photometric_params(torch.Generator().manual_seed(t)) for t in (s, s + 1000)]
        ours, theirs = data.photometric_augment(img.expand(2, -1, -1, -1), torch.stack([same, wrong]))
        assert_close(ours, ref, U8_MAX_TOL)
        means.append((ours - ref).abs().mean().item())
        other.append((theirs - ref).abs().mean().item())
    assert max(means) <= U8_MEAN_TOL, max(means)
    assert sum(other) / len(other) > 5 * U8_MEAN_TOL  # the check can tell parameters apart


# --- the CPU/device split against the whole train_transform / eval_transform


def pil_photo(w, h, seed):
    img = torch.nn.functional.interpolate(real_looking(1, 64, seed=seed).float(), size=(h, w), mode="bilinear")
    return Image.fromarray(img[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy())


def test_crop_then_device_transform_equals_train_transform():
    size, std = 48, min(data.CLIP_STD)
    for s in range(12):
        pil = pil_photo(90 + s, 70, seed=s)
        torch.manual_seed(s)
        ref = data.train_transform(size)(pil)
        torch.manual_seed(s)
        ref_crop = v2.Compose(data.train_transform(size).transforms[:3])(pil)
        torch.manual_seed(s)
        crop = data.train_crop_transform(size)(pil)
        assert crop.dtype == torch.uint8 and crop.shape == (3, size, size)
        assert torch.equal(crop, ref_crop)  # same crop box and flip from the same draws
        ours = data.device_transform(crop[None], data.draw_photometric_params()[None])[0]  # global generator
        assert_close(ours, ref.as_subclass(torch.Tensor), U8_MAX_TOL / std)


def test_device_transform_without_params_is_eval_transform():
    for s, (w, h) in enumerate([(90, 60), (50, 77), (64, 64)]):
        pil = pil_photo(w, h, seed=s)
        crop = data.eval_crop_transform(32)(pil)
        assert crop.dtype == torch.uint8 and crop.shape == (3, 32, 32)
        ours = data.device_transform(torch.stack([crop, crop]))
        ref = data.eval_transform(32)(pil).as_subclass(torch.Tensor)
        assert torch.equal(ours[0], ref) and torch.equal(ours[1], ref)


def test_bad_input_is_named():
    images, params = real_looking(2, 32), torch.zeros(2, data.PHOTOMETRIC_PARAMS)
    with pytest.raises(ValueError, match="uint8"):
        data.photometric_augment(as_float(images), params)
    with pytest.raises(ValueError, match="params"):
        data.photometric_augment(images, params[:1])
    with pytest.raises(ValueError, match="uint8"):
        data.device_transform(as_float(images))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    images = real_looking(16, 224, seed=4)
    g = torch.Generator().manual_seed(9)
    params = torch.stack([data.draw_photometric_params(g) for _ in range(16)])
    cpu = data.device_transform(images, params)
    cuda = data.device_transform(images.cuda(), params)  # params stay on the CPU: moved by photometric_augment
    assert_close(cuda.cpu(), cpu, FLOAT_TOL / min(data.CLIP_STD))
