"""The two-view training augmentation of both stages on whole batches, on the device the images live on.

The training transform (docs/method.md, "Data and augmentation") is RandomResizedCrop(image_size,
scale=(0.2, 1.0)), ColorJitter(0.4, 0.4, 0.4, 0.4), RandomGrayscale(0.2), RandomHorizontalFlip,
ToTensor, Normalize, applied twice to each image (two independent views). ``datasets.train_transform``
runs it with torchvision's v1 transforms on PIL images, one image at a time in worker processes;
this module draws the same parameters from the same distributions for a whole batch at once and
applies them with tensor ops, so the augmentation runs on the GPU next to the network
(``--gpu_augment``). No step loops over samples: the 10 crop tries are drawn as one (n, 10) tensor,
and the only Python loops are over the 4 positions x 4 colour ops of ColorJitter's random order and
over the batches of an epoch.

kornia (imported on first use: 0.3 to 0.5 s) runs the steps it draws as torchvision does: the four
colour ops (``kornia.enhance``, torchvision's formulas), RandomGrayscale and RandomHorizontalFlip (its
modules: an independent coin per image). The rest is written here, where kornia (0.9.0) differs:
- crop boxes: its ResizedCropGenerator places the fallback crop (all 10 tries failed) anywhere,
  torchvision centres it (they differ on a non-square image whose ratio gets clamped);
- resize: its RandomResizedCrop interpolates each crop in turn without antialiasing, where PIL's
  BILINEAR widens its filter when shrinking;
- jitter: its ColorJitter draws one order of the four ops per batch, torchvision one per image;
- SVHN's RandomAffine (refused, ``check_supported``): its translations are continuous,
  torchvision's ``get_params`` rounds them to whole pixels.

Where the result differs from ``datasets.train_transform`` (the PIL pipeline):
- PIL works in uint8 and rounds after each of its two resize passes and after every colour op;
  here everything stays float32 in [0, 1] from ToTensor's ``/255`` onwards (the resize alone
  differs from PIL's by at most 1.5/255, 0.5/255 on average; tests/test_gpu_augment.py).
- The resize is PIL's BILINEAR filter (triangle kernel, its support widened by the scale when
  shrinking, i.e. antialiased, taps clipped to the crop box and renormalized) evaluated in float;
  it equals torchvision's tensor ``resized_crop(..., antialias=True)``, not grid_sample's
  bilinear, which would blend in pixels outside the crop box at its edges and not antialias.
- The colour ops are torchvision's tensor formulas (what ColorJitter runs on tensors) with PIL's
  luma weights (0.299, 0.587, 0.114; torchvision's tensor path uses 0.2989 for red), also for
  RandomGrayscale; contrast blends with the float mean of the luma image where PIL's ImageEnhance
  rounds that mean to an integer; hue is shifted in float HSV where PIL shifts an 8-bit hue channel.
- The random numbers come from the global generator of the images' device (kornia's modules take
  no generator) in another order than torchvision's, so a seed gives other (equally distributed)
  augmentations than the CPU loader.
"""
import math

import numpy as np
import torch

from lib.errors import InputError

from .registry import DATASETS

# ColorJitter's ops by id, in torchvision's numbering (fn_idx)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def check_supported(dataset):
    """One clear line when data set ``dataset``'s training augmentation is not the one drawn here: only the
    released flip variant is implemented on the device, not SVHN's affine (datasets/transforms.py): kornia's
    RandomAffine would draw other translations (module docstring). A name not in the registry (None: a caller
    that names none) is left to the caller."""
    entry = DATASETS.get(dataset)
    augmentation = "flip" if entry is None else entry.augmentation
    if augmentation != "flip":
        raise InputError(f"--gpu_augment does not implement {dataset}'s {augmentation!r} augmentation (only the "
                         f"horizontal-flip one); leave --gpu_augment out")


def _uniform(n, low, high, device, generator, dtype=torch.float32):
    """(n,) draws of U(low, high)."""
    return torch.rand(n, device=device, generator=generator, dtype=dtype) * (high - low) + low


def _randint_below(upper, device, generator):
    """One draw of randint(0, upper) for each entry of the (n,) long tensor ``upper`` (≥ 1)."""
    u = torch.rand(upper.shape, device=device, generator=generator, dtype=torch.float64)
    # floor(u · upper) is uniform on {0, ..., upper−1}; the clamp only guards float rounding at u → 1
    return torch.minimum((u * upper).long(), upper - 1)


def sample_crop_params(n, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), device=None, generator=None):
    """RandomResizedCrop's crop boxes for ``n`` images of height x width (the method's scale=(0.2, 1.0)).

    Follows ``torchvision.transforms.RandomResizedCrop.get_params`` in distribution: up to 10 tries
    of target area = H·W·U(scale) and aspect ratio = exp(U(log ratio[0], log ratio[1])), with
    w = round(sqrt(area·ratio)), h = round(sqrt(area / ratio)) (round half to even, as Python's
    ``round``); the first try with 0 < w ≤ W and 0 < h ≤ H wins and its corner is
    top ~ randint(0, H − h + 1), left ~ randint(0, W − w + 1). When all 10 fail: the central crop
    of the whole image, its aspect ratio clamped into [min(ratio), max(ratio)] (kornia's sampler
    places this one at random). The 10 tries are drawn for every sample at once (draws of tries
    after the accepted one are simply unused).

    Returns (top, left, h, w), each a long tensor of shape (n,).
    """
    area = height * width
    log_ratio = torch.log(torch.tensor([float(r) for r in ratio], dtype=torch.float64))
    target_area = area * _uniform(n * 10, scale[0], scale[1], device, generator, torch.float64).view(n, 10)
    aspect = torch.exp(_uniform(n * 10, log_ratio[0].item(), log_ratio[1].item(), device, generator,
                                torch.float64)).view(n, 10)
    w = torch.round(torch.sqrt(target_area * aspect)).long()  # (n, 10)
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.long().argmax(dim=1, keepdim=True)  # index of the first accepted try (0 if none)
    accepted = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # fallback: central crop (torchvision's branch, on Python numbers since it depends only on H, W)
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    w = torch.where(accepted, w, torch.full_like(w, fw))
    h = torch.where(accepted, h, torch.full_like(h, fh))
    top = _randint_below(height - h + 1, device, generator)
    left = _randint_below(width - w + 1, device, generator)
    top = torch.where(accepted, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(accepted, left, torch.full_like(left, (width - fw) // 2))
    return top, left, h, w


def _factor_range(value, center):
    """ColorJitter's ``_check_input``: strength v -> [max(0, center − v), center + v]; None when off."""
    if value is None or value == 0:
        return None
    if center == 1:
        return max(0.0, 1.0 - float(value)), 1.0 + float(value)
    return -float(value), float(value)


def sample_jitter_params(n, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4, device=None, generator=None):
    """ColorJitter(0.4, 0.4, 0.4, 0.4)'s parameters for ``n`` images.

    As ``torchvision.transforms.ColorJitter.get_params``: brightness, contrast and saturation
    factors ~ U(max(0, 1 − v), 1 + v), hue shift ~ U(−v, v), and a uniformly random order of the
    four ops per image (torchvision's ``fn_idx = torch.randperm(4)``; kornia's ColorJitter draws one
    order per batch). A strength of 0 (or None) turns that op off; its entry is then None.

    Returns a dict: 'brightness', 'contrast', 'saturation', 'hue' -> (n,) float tensors or None;
    'order' -> (n, 4) long, row i the op ids (0 brightness, 1 contrast, 2 saturation, 3 hue) in
    the order they are applied to image i.
    """
    params = {}
    for name, value, center in zip(JITTER_OPS, (brightness, contrast, saturation, hue), (1, 1, 1, 0)):
        bounds = _factor_range(value, center)
        params[name] = None if bounds is None else _uniform(n, *bounds, device, generator)
    # argsort of i.i.d. uniforms is a uniformly random permutation of each row
    params["order"] = torch.rand(n, 4, device=device, generator=generator).argsort(dim=1)
    return params


def colour_ops():
    """ColorJitter's four ops from ``kornia.enhance``, in op-id order (``JITTER_OPS``): each maps img
    (n, 3, H, W) in [0, 1] and per-image factors (n,) to the adjusted images, clamped to [0, 1].

    torchvision's tensor formulas (brightness scales; contrast blends with the mean of the image's luma,
    saturation with its luma pixel by pixel; hue shifts in HSV) with PIL's luma weights; the hue factor is
    in turns, as torchvision's (kornia's ``adjust_hue`` takes radians).
    """
    from kornia import enhance  # here, not at import: kornia takes 0.3 to 0.5 s to import

    def adjust_hue(img, factor):
        return enhance.adjust_hue(img, factor * (2 * math.pi))

    return (enhance.adjust_brightness_accumulative, enhance.adjust_contrast_with_mean_subtraction,
            enhance.adjust_saturation_with_gray_subtraction, adjust_hue)


def color_jitter(img, params):
    """ColorJitter with per-image factors and per-image op order from ``sample_jitter_params``.

    At position j every op k is computed for the whole batch and kept (torch.where) for the images
    whose j-th op is k, so each image sees its four ops in its own order without a loop over images.
    img: (n, 3, H, W) float in [0, 1].
    """
    order = params["order"]
    ops = colour_ops()
    for j in range(4):
        current = img
        for k, (name, adjust) in enumerate(zip(JITTER_OPS, ops)):
            if params[name] is None:
                continue
            chosen = (order[:, j] == k).view(-1, 1, 1, 1)
            img = torch.where(chosen, adjust(current, params[name]), img)
    return img


def _resample_matrix(start, length, in_size, out_size):
    """PIL's bilinear resampling of the window [start, start + length) to out_size pixels, as a matrix.

    Output pixel y has its centre at start + (y + 0.5)·length/out_size in input coordinates; input
    pixel i (centre i + 0.5) gets the triangle weight max(0, 1 − |i + 0.5 − centre| / s) with
    s = max(length/out_size, 1) (the support widens when shrinking: antialiasing), taps outside the
    window get 0 and each row is renormalized to sum 1 (Pillow's ``precompute_coeffs``).
    start, length: (n,) long. Returns (n, out_size, in_size) float32.
    """
    device = start.device
    start, length = start.to(torch.float64), length.to(torch.float64)
    scale = length / out_size  # (n,)
    support = scale.clamp(min=1.0)
    centre = start[:, None] + (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale[:, None]
    pixel = torch.arange(in_size, device=device, dtype=torch.float64)  # (in,)
    weight = (1.0 - (pixel + 0.5 - centre[:, :, None]).abs() / support[:, None, None]).clamp(min=0.0)
    inside = (pixel >= start[:, None, None]) & (pixel < (start + length)[:, None, None])
    weight = weight * inside  # (n, out, in)
    return (weight / weight.sum(dim=-1, keepdim=True)).to(torch.float32)


def resized_crop(img, top, left, h, w, size):
    """Crop box (top, left, h, w) of each image and resize it to size x size, bilinear as PIL.

    img: (n, C, H, W) float; top, left, h, w: (n,) long. Returns (n, C, size, size). Separable:
    out = R_y · img · R_xᵀ with the two (n, size, H) and (n, size, W) matrices of
    ``_resample_matrix``, which equals cropping and then resizing with PIL's BILINEAR filter
    (torchvision's RandomResizedCrop default) in float arithmetic (kornia's RandomResizedCrop does
    not antialias). The matrix products assume PyTorch's default full-float32 matmul precision (with
    TF32 allowed they err by about 1e-3).
    """
    rows = _resample_matrix(top, h, img.shape[-2], size).to(img.dtype)  # (n, size, H)
    cols = _resample_matrix(left, w, img.shape[-1], size).to(img.dtype)  # (n, size, W)
    out = torch.matmul(rows.unsqueeze(1), img)  # (n, C, size, W)
    return torch.matmul(out, cols.transpose(1, 2).unsqueeze(1))  # (n, C, size, size)


def augment(images_uint8, mean, std, size=32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
            brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4, grayscale_p=0.2, flip_p=0.5):
    """One independent draw of the training transform for each image of a batch.

    images_uint8: (n, H, W, 3) uint8 on any device. Returns (n, 3, size, size) float32 on that device:
    RandomResizedCrop(size, scale, ratio) -> ColorJitter(brightness, contrast, saturation, hue) ->
    RandomGrayscale(grayscale_p) -> RandomHorizontalFlip(flip_p) -> ToTensor -> Normalize(mean, std).
    ``scale=None`` resizes the whole image instead of a random crop and a jitter strength of 0
    turns that op off, so a test can switch every random step off. Every draw comes from the global
    generator of the images' device (kornia's modules take no generator argument).
    """
    from kornia import augmentation  # here, not at import: kornia takes 0.3 to 0.5 s to import

    n, height, width, _ = images_uint8.shape
    device = images_uint8.device
    img = images_uint8.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # ToTensor: (n, 3, H, W) in [0, 1]

    if scale is None:
        top = left = torch.zeros(n, dtype=torch.long, device=device)
        h, w = torch.full_like(top, height), torch.full_like(top, width)
    else:
        top, left, h, w = sample_crop_params(n, height, width, scale, ratio, device)
    img = resized_crop(img, top, left, h, w, size)  # (n, 3, size, size)
    # the filter's weights are convex, but float rounding may step a hair outside [0, 1]
    img = img.clamp(0.0, 1.0)

    img = color_jitter(img, sample_jitter_params(n, brightness, contrast, saturation, hue, device))

    for step in (augmentation.RandomGrayscale(p=grayscale_p), augmentation.RandomHorizontalFlip(p=flip_p)):
        step.set_rng_device_and_dtype(device, torch.float32)  # its coins drawn on the images' device
        img = step(img)

    # no copy when mean and std are already tensors on the device (GpuTwoViewLoader passes them so)
    mean = torch.as_tensor(mean, dtype=img.dtype, device=device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=img.dtype, device=device).view(1, -1, 1, 1)
    return (img - mean) / std


def two_view_augment(images_uint8, mean, std, size=32, **switches):
    """Two independent views of each image: (B, H, W, 3) uint8 -> (2B, 3, size, size).

    Rows 0..B−1 are view 1, rows B..2B−1 view 2 (the order both stages feed the network). Every
    random parameter is drawn independently per row, as two calls of the torchvision transform
    would. ``switches`` are ``augment``'s keywords (scale, ratio, the jitter strengths,
    grayscale_p, flip_p), the method's values by default (docs/method.md, "Data and augmentation").

    Differences from the PIL pipeline of ``datasets.train_transform`` (see the module docstring):
    resampling and colour ops in float32 without PIL's rounding to uint8 between steps; the
    resize is PIL's antialiased bilinear filter, exactly, up to that rounding; the colour ops
    are torchvision's tensor formulas with PIL's luma (float contrast mean, float HSV hue shift).
    """
    return augment(torch.cat([images_uint8, images_uint8]), mean, std, size, **switches)


class GpuTwoViewLoader:
    """The two-view training loader (shuffle, drop_last) with the augmentation on ``device``.

    The uint8 images go to ``device`` once, in chunks (a file-backed array such as STL-10's or a
    folder's cache is read chunk by chunk, never whole into host memory); each epoch shuffles with
    ``torch.randperm`` on the device's global generator (so a checkpoint's RNG state makes a resumed
    run draw the same epochs) and yields the batches the DataLoader over
    ``datasets.ImageDataset(views=2)`` yields: dicts with "view1" and "view2" (B, 3, size, size)
    float32 and "target" and "index" (B,) long, all on ``device``.

    With several processes, ``sampler`` (a ``datasets.sharding.ShardSampler``) gives this process's
    indexes of the epoch's shared shuffle and ``batch_size`` is this process's share b of the global batch;
    each process augments only its own images.
    """

    UPLOAD_CHUNK = 4096  # images copied to the device at a time

    def __init__(self, images, targets, batch_size, mean, std, device, size=32, sampler=None):
        try:  # here: without kornia a run stops at start-up, in one line, not at its first batch
            import kornia  # noqa: F401
        except ImportError:
            raise InputError("--gpu_augment needs kornia (pip install -r requirements.txt), which is not "
                             "installed; install it or leave --gpu_augment out") from None

        device = torch.device(device)
        if len(getattr(images, "shape", ())) != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3) uint8, not {tuple(getattr(images, 'shape', ()))}")
        self.images = torch.empty(tuple(images.shape), dtype=torch.uint8, device=device)  # (N, H, W, 3)
        for start in range(0, len(images), self.UPLOAD_CHUNK):
            chunk = images[start:start + self.UPLOAD_CHUNK]
            if not isinstance(chunk, torch.Tensor):
                chunk = torch.tensor(np.asarray(chunk, dtype=np.uint8))  # a copy: mapped images are read-only
            self.images[start:start + len(chunk)] = chunk.to(device=device, dtype=torch.uint8)
        self.targets = torch.as_tensor(targets, dtype=torch.long).to(device)  # (N,)
        if self.targets.shape != self.images.shape[:1]:
            raise ValueError(f"{len(self.targets)} targets for {len(self.images)} images")
        self.batch_size = int(batch_size)
        self.num_samples = len(self.images)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)  # (3,), copied once
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.device = device
        self.size = size
        self.sampler = sampler

    def __len__(self):
        if self.sampler is not None:
            return len(self.sampler) // self.batch_size
        return self.num_samples // self.batch_size  # drop_last

    def __iter__(self):
        if self.sampler is not None:
            order = self.sampler.indexes().to(self.device)  # this process's share of every step, in order
        else:
            order = torch.randperm(self.num_samples, device=self.device)
        for step in range(len(self)):
            indexes = order[step * self.batch_size:(step + 1) * self.batch_size]  # (B,)
            views = two_view_augment(self.images[indexes], self.mean, self.std, self.size)  # (2B, 3, size, size)
            yield {"view1": views[:self.batch_size], "view2": views[self.batch_size:],
                   "target": self.targets[indexes], "index": indexes}
