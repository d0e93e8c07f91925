"""The batched augmentation (datasets/gpu_augment.py) against torchvision's v1 transforms
(docs/method.md, "Data and augmentation").

Parameter distributions are compared with torchvision's own samplers by two-sample KS tests;
each op is compared with torchvision's functional on the same fixed parameters; the rates of the
random choices are measured from the outputs.
"""
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms
from torchvision.transforms import functional as TF

from datasets import gpu_augment as ga

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # CIFAR-10's normalization
OFF = dict(scale=None, brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=0.0, flip_p=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def binomial_ok(hits, n, p, sigmas=5):
    """|hits/n − p| within ``sigmas`` binomial standard deviations."""
    return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def colourful_images(n, height=32, width=32, seed=0):
    """uint8 (n, H, W, 3) smooth colour images (no two channels alike) in mid range."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 0.6 + 0.2
    img = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ---------------------------------------------------------------- crop parameters

def torchvision_crops(n, height, width, scale, ratio):
    img = torch.zeros(3, height, width)
    return np.array([transforms.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


@pytest.mark.parametrize("height, width, scale, ratio", [
    (32, 32, (0.2, 1.0), (3 / 4, 4 / 3)),  # the method's crop on CIFAR
    (28, 40, (0.2, 1.0), (3 / 4, 4 / 3)),
    (28, 40, (0.5, 1.0), (2.0, 4.0)),  # many tries too wide: the central-crop fallback is common (~28%)
])
def test_crop_params_match_torchvision(height, width, scale, ratio):
    n = 6000  # KS tells apart CDFs 0.04 apart at p < 1e-3
    torch.manual_seed(0)
    ref = torchvision_crops(n, height, width, scale, ratio)  # (n, 4): top, left, h, w
    top, left, h, w = ga.sample_crop_params(n, height, width, scale, ratio, generator=torch.Generator().manual_seed(1))
    ours = torch.stack([top, left, h, w], dim=1).numpy()
    assert ours.dtype == np.int64 and ours.shape == (n, 4)
    # every box lies inside the image and is non-empty
    assert (ours[:, :2] >= 0).all() and (ours[:, 2:] >= 1).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    stats_of = {
        "area": lambda c: c[:, 2] * c[:, 3] / (height * width),
        "aspect": lambda c: c[:, 3] / c[:, 2],
        "top": lambda c: c[:, 0],
        "left": lambda c: c[:, 1],
        "h": lambda c: c[:, 2],
    }
    for name, stat in stats_of.items():
        p = stats.ks_2samp(stat(ours), stat(ref)).pvalue
        assert p > 1e-3, f"{name}: KS p = {p:.2e}"
    # the fallback (central crop with the ratio clamped) is hit as often as torchvision hits it
    if ratio == (2.0, 4.0):
        fallback = (4, 0, 20, 40)  # 40/28 < 2: w = 40, h = round(40 / 2), centred
        ref_rate = (ref == fallback).all(1).mean()
        hits = int((ours == fallback).all(1).sum())
        assert 0.05 < ref_rate < 0.95
        assert binomial_ok(hits, n, ref_rate, sigmas=6)


def test_crop_fallback_exact():
    # every try fails (w > W always): torchvision's central crop, ratio clamped to max(ratio) = 3 -> 40 x 13
    top, left, h, w = ga.sample_crop_params(500, 28, 40, scale=(0.9, 1.0), ratio=(3.0, 4.0))
    ref = transforms.RandomResizedCrop.get_params(torch.zeros(3, 28, 40), [0.9, 1.0], [3.0, 4.0])
    assert ref == (7, 0, 13, 40)
    assert (top == 7).all() and (left == 0).all() and (h == 13).all() and (w == 40).all()
    # a tall image with a wide ratio range clamps the other way: h = H, w = round(H · max(ratio))
    top, left, h, w = ga.sample_crop_params(50, 40, 10, scale=(0.95, 1.0), ratio=(0.5, 0.6))
    ref = transforms.RandomResizedCrop.get_params(torch.zeros(3, 40, 10), [0.95, 1.0], [0.5, 0.6])
    assert set(zip(top.tolist(), left.tolist(), h.tolist(), w.tolist())) == {ref}


def test_crop_params_generator_is_reproducible():
    a = ga.sample_crop_params(100, 32, 32, generator=torch.Generator().manual_seed(5))
    b = ga.sample_crop_params(100, 32, 32, generator=torch.Generator().manual_seed(5))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- jitter parameters

def test_jitter_params_ranges_uniformity_and_order():
    n = 20000
    params = ga.sample_jitter_params(n, generator=torch.Generator().manual_seed(0))
    for name, (low, high) in [("brightness", (0.6, 1.4)), ("contrast", (0.6, 1.4)), ("saturation", (0.6, 1.4)),
                              ("hue", (-0.4, 0.4))]:
        f = params[name]
        assert f.shape == (n,)
        assert f.min() >= low and f.max() <= high
        assert f.min() < low + 0.01 and f.max() > high - 0.01  # the whole range, not a part of it
        assert abs(f.mean().item() - (low + high) / 2) < 0.01
        assert stats.kstest(f.numpy(), "uniform", args=(low, high - low)).pvalue > 1e-3
    for a, b in [("brightness", "contrast"), ("contrast", "saturation"), ("saturation", "hue")]:
        assert abs(np.corrcoef(params[a].numpy(), params[b].numpy())[0, 1]) < 0.05  # drawn independently
    order = params["order"]
    assert order.shape == (n, 4) and order.dtype == torch.long
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))  # each row a permutation
    for position in range(4):
        for op in range(4):
            assert binomial_ok(int((order[:, position] == op).sum()), n, 0.25), (position, op)
    # all 24 orders occur, about equally often
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert len(counts) == 24 and stats.chisquare(counts.numpy()).pvalue > 1e-3


def test_jitter_strength_zero_turns_op_off():
    params = ga.sample_jitter_params(10, brightness=0, contrast=0.4, saturation=None, hue=0)
    assert params["brightness"] is None and params["saturation"] is None and params["hue"] is None
    assert params["contrast"].shape == (10,)
    # strengths above 1 clip the lower bound at 0 as torchvision does
    assert ga.sample_jitter_params(1000, brightness=1.5)["brightness"].min() >= 0


# ---------------------------------------------------------------- each op against torchvision

@pytest.fixture
def float_images():
    g = torch.Generator().manual_seed(3)
    img = torch.rand(6, 3, 17, 23, generator=g)
    img[0] = img[0, :1]  # a grey image: hue and saturation must leave it alone
    img[1, :, :4] = 1.0  # saturated pixels: the clamp matters for brightness > 1
    img[2, :, 5:9, 5:9] = 0.0
    return img


@pytest.mark.parametrize("name, factors, atol", [
    ("brightness", [0.6, 1.4, 1.0, 0.9, 1.2, 0.65], 1e-6),
    ("contrast", [0.6, 1.4, 1.0, 0.9, 1.2, 0.65], 1e-6),
    ("saturation", [0.6, 1.4, 1.0, 0.9, 1.2, 0.65], 1e-6),
    ("hue", [-0.4, 0.4, 0.0, 0.1, -0.25, 0.33], 1e-5),
])
def test_each_colour_op_matches_torchvision(float_images, name, factors, atol):
    ours = ga.colour_ops()[ga.JITTER_OPS.index(name)](float_images, torch.tensor(factors))
    reference = getattr(TF, f"adjust_{name}")
    expected = torch.stack([reference(img, f) for img, f in zip(float_images, factors)])  # slow loop
    # kornia's luma weighs red 0.299 (PIL's), torchvision's tensor path 0.2989: contrast and saturation blend
    # towards lumas up to 1e-4 apart, with weight 1 − factor; brightness and hue use no luma
    luma_gap = 1e-4 * (1 - torch.tensor(factors)).abs().view(-1, 1, 1, 1) * (name in ("contrast", "saturation"))
    assert ((ours - expected).abs() <= atol + luma_gap).all(), (ours - expected).abs().max()
    assert ours.min() >= 0 and ours.max() <= 1


def test_color_jitter_applies_each_images_own_order(float_images):
    n = len(float_images)
    params = ga.sample_jitter_params(n, generator=torch.Generator().manual_seed(4))
    params["order"][0] = torch.tensor([3, 2, 1, 0])  # the order matters: contrast after hue != before
    params["order"][1] = torch.tensor([0, 1, 2, 3])
    ours = ga.color_jitter(float_images, params)
    reference = ga.colour_ops()  # each op against torchvision's: the test above
    expected = []
    for i, img in enumerate(float_images[:, None]):  # torchvision's ColorJitter.forward, one image at a time
        for op in params["order"][i].tolist():
            img = reference[op](img, params[ga.JITTER_OPS[op]][i:i + 1])
        expected.append(img[0])
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-5, rtol=0)
    # the same factors in a fixed order give a different result: the order is really used
    fixed = dict(params, order=torch.arange(4).expand(n, 4))
    assert not torch.allclose(ga.color_jitter(float_images, fixed), ours, atol=1e-3)


def test_grayscale_is_pils_luma():
    images = colourful_images(6, 16, 16)
    grey = ga.augment(images, (0, 0, 0), (1, 1, 1), size=16, **dict(OFF, grayscale_p=1.0))  # (6, 3, 16, 16)
    assert torch.equal(grey[:, :1].expand_as(grey), grey)
    # PIL's convert("L") (the CPU path's RandomGrayscale) rounds its fixed-point luma to an integer
    pil = torch.stack([torch.from_numpy(np.array(Image.fromarray(img.numpy()).convert("L"))) for img in images])
    assert (grey[:, 0] - pil.float() / 255).abs().max() <= 0.5 / 255 + 1e-6
    # torchvision's tensor path weighs red 0.2989, not 0.299
    reference = TF.rgb_to_grayscale(images.permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(grey[:, :1], reference, atol=1e-4, rtol=0)


def test_full_image_crop_is_identity():
    img = torch.rand(4, 3, 32, 32)
    zeros = torch.zeros(4, dtype=torch.long)
    out = ga.resized_crop(img, zeros, zeros, zeros + 32, zeros + 32, 32)
    torch.testing.assert_close(out, img, atol=1e-6, rtol=0)


@pytest.mark.parametrize("height, width, size", [(32, 32, 32), (28, 40, 32), (96, 80, 32)])
def test_resized_crop_matches_torchvision(height, width, size):
    n = 12
    g = torch.Generator().manual_seed(height)
    top, left, h, w = ga.sample_crop_params(n, height, width, generator=g)
    img_u8 = colourful_images(n, height, width, seed=1)
    img = img_u8.permute(0, 3, 1, 2).float() / 255
    ours = ga.resized_crop(img, top, left, h, w, size)
    assert ours.shape == (n, 3, size, size)
    boxes = list(zip(top.tolist(), left.tolist(), h.tolist(), w.tolist()))
    # torchvision's tensor path (antialiased bilinear, Pillow's filter in float)
    expected = torch.stack([TF.resized_crop(img[i], *boxes[i], [size, size], antialias=True) for i in range(n)])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # the PIL path the CPU loader runs: the same up to PIL's rounding to uint8 after each of its two passes
    pil = np.stack([np.asarray(TF.resized_crop(Image.fromarray(img_u8[i].numpy()), *boxes[i], [size, size]))
                    for i in range(n)])
    pil = torch.from_numpy(pil).permute(0, 3, 1, 2).float() / 255
    assert (ours - pil).abs().max() <= 1.5 / 255
    assert (ours - pil).abs().mean() <= 0.5 / 255


# ---------------------------------------------------------------- the whole pipeline

def test_two_view_shape_dtype_and_views_differ():
    images = colourful_images(8)
    torch.manual_seed(0)
    out = ga.two_view_augment(images, MEAN, STD)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32 and out.device == images.device
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[:8], out[8:], atol=1e-3)  # the two views are drawn independently
    for i in range(8):
        assert not torch.allclose(out[i], out[8 + i], atol=1e-3)
    # non-square input, another output size
    assert ga.two_view_augment(colourful_images(3, 28, 40), MEAN, STD, size=24).shape == (6, 3, 24, 24)


def test_all_random_steps_off_is_to_tensor_and_normalize():
    images = colourful_images(5)
    out = ga.two_view_augment(images, MEAN, STD, **OFF)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, torch.cat([expected, expected]), atol=1e-5, rtol=0)
    # against torchvision's ToTensor + Normalize on the PIL image
    ref = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    torch.testing.assert_close(out[2], ref(Image.fromarray(images[2].numpy())), atol=1e-5, rtol=0)


def test_flip_is_torch_flip_at_rate_one_half():
    ramp = torch.arange(32, dtype=torch.uint8).mul(7).view(1, 1, 32, 1).expand(400, 32, 32, 3).contiguous()
    plain = ga.two_view_augment(ramp, (0, 0, 0), (1, 1, 1), **OFF)
    torch.testing.assert_close(ga.two_view_augment(ramp, (0, 0, 0), (1, 1, 1), **dict(OFF, flip_p=1.0)),
                               torch.flip(plain, dims=[-1]), atol=0, rtol=0)
    torch.manual_seed(0)
    out = ga.two_view_augment(ramp, (0, 0, 0), (1, 1, 1), **dict(OFF, flip_p=0.5))
    flipped = (out == torch.flip(plain, dims=[-1])).flatten(1).all(1)
    unflipped = (out == plain).flatten(1).all(1)
    assert bool((flipped ^ unflipped).all())  # each output is exactly one of the two
    assert binomial_ok(int(flipped.sum()), 800, 0.5)


def test_grayscale_rate_with_everything_on():
    images = colourful_images(2000, 8, 8)  # small images keep 4000 outputs cheap on a CPU
    torch.manual_seed(0)
    out = ga.two_view_augment(images, (0, 0, 0), (1, 1, 1), size=8)
    grey = ((out[:, 0] - out[:, 1]).abs().amax((1, 2)) < 1e-6) & ((out[:, 1] - out[:, 2]).abs().amax((1, 2)) < 1e-6)
    assert binomial_ok(int(grey.sum()), 4000, 0.2)
    # the grey outputs are the luma of the colour pipeline: values stay in [0, 1]
    assert out.min() >= 0 and out.max() <= 1


def test_whole_pipeline_matches_torchvision_in_distribution():
    """Per-output statistics of the training transform on one image: ours vs torchvision's PIL pipeline."""
    n, size = 1000, 16  # 16 x 16 images keep it cheap; the crop test covers 32 x 32
    image = colourful_images(1, size, size, seed=7)[0]
    reference = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0)), transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomGrayscale(p=0.2), transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    torch.manual_seed(0)
    pil = Image.fromarray(image.numpy())
    ref = torch.stack([reference(pil) for _ in range(n)])
    torch.manual_seed(1)
    ours = ga.augment(image.expand(n, size, size, 3), (0, 0, 0), (1, 1, 1), size=size)
    checks = {
        "red mean": lambda x: x[:, 0].mean((1, 2)),
        "blue mean": lambda x: x[:, 2].mean((1, 2)),
        "pixel std": lambda x: x.std((1, 2, 3)),
        "red - green": lambda x: (x[:, 0] - x[:, 1]).mean((1, 2)),
        "left - right": lambda x: x[..., :size // 2].mean((1, 2, 3)) - x[..., size // 2:].mean((1, 2, 3)),
        "top - bottom": lambda x: x[:, :, :size // 2].mean((1, 2, 3)) - x[:, :, size // 2:].mean((1, 2, 3)),
    }
    for name, stat in checks.items():
        p = stats.ks_2samp(stat(ours).numpy(), stat(ref).numpy()).pvalue
        assert p > 1e-3, f"{name}: KS p = {p:.2e}"
    grey = [int(((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1e-3).sum()) for x in (ours, ref)]
    assert stats.fisher_exact([[grey[0], n - grey[0]], [grey[1], n - grey[1]]]).pvalue > 1e-3


# ---------------------------------------------------------------- the loader

def make_loader(n=100, batch_size=16):
    images = colourful_images(n, 28, 40, seed=2).numpy()
    targets = torch.randint(10, (n,), generator=torch.Generator().manual_seed(0))
    return ga.GpuTwoViewLoader(images, targets, batch_size, MEAN, STD, torch.device("cpu")), images, targets


def test_loader_epoch():
    loader, _, targets = make_loader()
    assert len(loader) == 100 // 16 and loader.batch_size == 16 and loader.num_samples == 100
    seen = []
    for batch in loader:
        assert set(batch) == {"view1", "view2", "target", "index"}  # the DataLoader's keys (views=2)
        view1, view2, batch_targets, indexes = batch["view1"], batch["view2"], batch["target"], batch["index"]
        assert view1.shape == view2.shape == (16, 3, 32, 32) and view1.dtype == torch.float32
        assert batch_targets.dtype == indexes.dtype == torch.long and indexes.shape == (16,)
        assert torch.equal(batch_targets, targets[indexes])
        assert not torch.allclose(view1, view2, atol=1e-3)
        seen.append(indexes)
    seen = torch.cat(seen)
    assert len(seen) == len(loader) * 16 and len(seen.unique()) == len(seen)  # no repeats: drop_last
    assert seen.min() >= 0 and seen.max() < 100


def test_loader_is_determined_by_the_torch_seed():
    loader, images, _ = make_loader()
    torch.manual_seed(11)
    first = list(loader)
    second_epoch = list(loader)
    torch.manual_seed(11)
    again = list(loader)
    for a, b in zip(first, again):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key])
    assert not torch.equal(first[0]["index"], second_epoch[0]["index"])  # a new shuffle every epoch
    # the batch is the augmentation of the indexed images, drawn from the global generator
    torch.manual_seed(11)
    indexes = torch.randperm(100)[:16]
    views = ga.two_view_augment(torch.from_numpy(images)[indexes], MEAN, STD)
    assert torch.equal(first[0]["index"], indexes)
    assert torch.equal(first[0]["view1"], views[:16]) and torch.equal(first[0]["view2"], views[16:])


class CountingImages:
    """An array-like that records every slice read from it (a file-backed array stands in)."""

    def __init__(self, array):
        self.array, self.shape, self.reads = array, array.shape, []

    def __len__(self):
        return len(self.array)

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def test_loader_uploads_array_likes_in_chunks(monkeypatch):
    monkeypatch.setattr(ga.GpuTwoViewLoader, "UPLOAD_CHUNK", 7)
    images = colourful_images(20, 8, 8).numpy()
    source = CountingImages(images)
    loader = ga.GpuTwoViewLoader(source, torch.zeros(20, dtype=torch.long), 4, MEAN, STD, "cpu", size=8)
    assert torch.equal(loader.images, torch.from_numpy(images))
    assert source.reads == [slice(0, 7), slice(7, 14), slice(14, 21)]  # never the whole array at once
    assert next(iter(loader))["view1"].shape == (4, 3, 8, 8)


def test_without_kornia_the_loader_is_one_line(monkeypatch):
    """A Python without kornia (requirements.txt not installed again since it came in): --gpu_augment stops
    where the loader is built, with one line saying what to install, not at the first batch."""
    from lib.errors import InputError
    monkeypatch.setitem(sys.modules, "kornia", None)  # ``import kornia`` then raises ImportError
    with pytest.raises(InputError, match=r"--gpu_augment needs kornia \(pip install -r requirements.txt\)"):
        ga.GpuTwoViewLoader(np.zeros((4, 8, 8, 3), np.uint8), torch.zeros(4, dtype=torch.long), 2, MEAN, STD, "cpu")
