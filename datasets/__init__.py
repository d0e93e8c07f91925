"""Data: each data set's entry, its images and labels as an ``ImageDataset``, transforms and loaders.

``DATASETS[name]`` is a data set's one entry (``DatasetInfo``, datasets/registry.py): its reader, classes,
normalization, which splits each stage uses (docs/method.md, "Data sets") and whose images it shows
(``same_images``). ``build_dataset`` and ``from_args`` (datasets/build.py) read a split: uint8 images
(N, H, W, 3), in memory or mapped from disk, and int64 targets (-1 = no label). Items and batches
are dicts: ``views=2`` gives {"view1", "view2", "target", "index"} (two independent draws of the
training augmentation, docs/method.md, "Data and augmentation"), ``views=1`` gives
{"image", "target", "index"} through the evaluation transform (datasets/transforms.py). Loaders:
datasets/loaders.py. Nothing here imports ``engine``: the process group is read from torch.distributed
(datasets/processes.py).
"""
from . import arrays, folder, sources, stl10
from .build import build_dataset, from_args, require_files
from .images import ImageDataset
from .loaders import make_loader, make_train_loader
from .registry import DATASETS, DatasetInfo, same_images
from .transforms import eval_transform, train_transform

__all__ = ["DATASETS", "DatasetInfo", "ImageDataset", "arrays", "build_dataset", "eval_transform", "folder",
           "from_args", "make_loader", "make_train_loader", "require_files", "same_images", "sources", "stl10",
           "train_transform"]
