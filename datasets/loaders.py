"""Loaders over an ``ImageDataset``: the evaluation loader, the training loader (torchvision transforms in
worker processes, or ``--gpu_augment``'s batched augmentation on the device), and under torchrun each
process's share of one shuffle (datasets/sharding.py)."""
import torch

from . import processes
from .sharding import ShardSampler


def make_loader(dataset, batch_size, train, workers, device, seed=0):
    """Training loaders shuffle and drop the last partial batch (released); evaluation keeps order.

    Batches are the items' dicts with each entry stacked: {"view1", "view2", "target", "index"} or
    {"image", "target", "index"}, tensors on the host (pinned for CUDA). Under torchrun with P processes a
    training loader's ``batch_size`` is the global batch: this process takes batch_size / P images of
    each step from one shuffle shared by all, drawn from ``seed`` and the epoch (datasets/sharding.py).
    """
    sampler = _shard_sampler(len(dataset), batch_size, seed) if train else None
    if sampler is not None:
        batch_size = processes.split_batch(batch_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler, drop_last=train,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)


def make_train_loader(dataset, args, device):
    """The two-view training loader: torchvision transforms in ``args.workers`` processes, or with
    ``args.gpu_augment`` the same augmentations on whole batches on ``device`` (datasets/gpu_augment.py),
    yielding the same dict keys with the tensors already on ``device``. ``args.batch_size`` is the global
    batch (split over the processes of a torchrun launch)."""
    seed = getattr(args, "seed", 0)
    if not getattr(args, "gpu_augment", False):
        return make_loader(dataset, args.batch_size, True, args.workers, device, seed=seed)
    from . import gpu_augment
    gpu_augment.check_supported(getattr(args, "dataset", None))  # SVHN's affine is not implemented there
    return gpu_augment.GpuTwoViewLoader(dataset.data, dataset.targets, processes.split_batch(args.batch_size),
                                        dataset.mean, dataset.std, device, size=dataset.image_size,
                                        sampler=_shard_sampler(len(dataset), args.batch_size, seed))


def _shard_sampler(num_samples, batch_size, seed):
    """This process's share of every step (datasets/sharding.py) under torchrun; None for one process."""
    if processes.world_size() == 1:
        return None
    return ShardSampler(num_samples, batch_size, processes.rank(), processes.world_size(), seed)
