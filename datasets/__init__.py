"""Data sets: each a (uint8 image array, labels) pair wrapped in ``ImageDataset`` (REFERENCE §3, §5).

Training items are (view1, view2, target, index); evaluation items are (image, target, index).
"""
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from lib.runtime import InputError

from . import sources

# name -> (reader, classes, normalization mean, std)
DATASETS = {
    "cifar10": (sources.cifar10, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": (sources.cifar100, 100, (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)),
    "cifar20": (partial(sources.cifar100, coarse=True), 20, (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)),
    # computed over the padded 32x32 training images (tests/test_datasets.py recomputes them)
    "fashion-mnist": (sources.fashion_mnist, 10, (0.2190,) * 3, (0.3318,) * 3),
    # computed over the 1,497 upsampled training images (tests/test_datasets.py recomputes them)
    "digits": (sources.digits, 10, (0.3054,) * 3, (0.3221,) * 3),
}


def num_classes(name):
    return DATASETS[name][1]


def train_transform(name):
    """Two-view training augmentation of the released code."""
    mean, std = DATASETS[name][2:]
    return transforms.Compose([
        transforms.RandomResizedCrop(32, scale=(0.2, 1.0)),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def eval_transform(name):
    mean, std = DATASETS[name][2:]
    return transforms.Compose([
        transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize(mean, std)])


class ImageDataset(Dataset):
    """uint8 images (N, H, W, 3) and labels; ``views=2`` gives two independent augmentations of each image."""

    def __init__(self, data, targets, transform, views=1):
        self.data = data
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.transform = transform
        self.views = views

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index])
        target = int(self.targets[index])
        if self.views == 2:
            return self.transform(image), self.transform(image), target, index
        return self.transform(image), target, index


def build_dataset(name, data_dir, train, views=1, transform=None, subset=None):
    """The training (``train=True``) or test split of ``name``; ``subset`` keeps its first N images.

    ``transform`` defaults to the two-view training augmentation when ``views == 2`` and to the
    evaluation transform otherwise.
    """
    if name not in DATASETS:
        raise InputError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    data, targets = DATASETS[name][0](data_dir, train)
    if subset is not None:
        if subset < 1:
            raise InputError(f"--subset must be a positive number of images, not {subset}")
        data, targets = data[:subset], targets[:subset]
    if transform is None:
        transform = train_transform(name) if views == 2 else eval_transform(name)
    return ImageDataset(np.ascontiguousarray(data), targets, transform, views)


def make_loader(dataset, batch_size, train, workers, device):
    """Training loaders shuffle and drop the last partial batch (released); evaluation keeps order."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False)


def make_train_loader(dataset, args, device):
    """The two-view training loader: torchvision transforms in ``args.workers`` processes, or with
    ``args.gpu_augment`` the same augmentations on whole batches on ``device`` (lib/gpu_augment.py)."""
    if not getattr(args, "gpu_augment", False):
        return make_loader(dataset, args.batch_size, True, args.workers, device)
    from lib.gpu_augment import GpuTwoViewLoader
    mean, std = DATASETS[args.dataset][2:]
    return GpuTwoViewLoader(dataset.data, dataset.targets, args.batch_size, mean, std, device)
