"""``ImageDataset``: uint8 images and their targets as items of one or two transformed views."""
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class ImageDataset(Dataset):
    """uint8 images (N, H, W, 3) and their targets; ``views=2`` gives two independent augmentations of each.

    data: a numpy array, or an array-like mapped from disk (``datasets.arrays``: indexing reads
    only the images asked for; ``np.asarray(data)`` reads all). targets: (N,) long, -1 = no label.
    mean, std: the normalization the transforms use. paths: each image's file (``folder`` only).
    image_size: the side of the images the transforms give.
    """

    def __init__(self, data, targets, transform, views=1, *, num_classes=None, class_names=None, mean=None,
                 std=None, paths=None, image_size=32):
        self.data = data
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.transform = transform
        self.views = views
        self.num_classes = num_classes
        self.class_names = None if class_names is None else list(class_names)
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self.paths = paths
        self.image_size = image_size

    @property
    def has_labels(self):
        """True when every image has a label (no target is -1)."""
        return bool((self.targets >= 0).all())

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image = Image.fromarray(np.ascontiguousarray(self.data[index]))  # (H, W, 3) uint8
        target = int(self.targets[index])
        if self.views == 2:
            return {"view1": self.transform(image), "view2": self.transform(image), "target": target, "index": index}
        return {"image": self.transform(image), "target": target, "index": index}
