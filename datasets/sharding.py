"""One shuffle of the training images shared by several processes, each taking its share of every step.

With P processes and a global batch of B images (b = B/P each), an epoch is one permutation of the N
images drawn from (seed, epoch), cut to whole global batches as the single-process loader drops its
last partial batch (released): steps = ⌊N/B⌋. Step k's global batch is order[kB:(k+1)B], and process
r takes its slice order[kB + rb : kB + (r+1)b]; gathered in rank order the slices are the global batch
again, in the loader's order. So every index of order[:steps·B] is visited exactly once per epoch
across the processes, and the shuffle depends only on (seed, epoch), not on P's history: a run
resumed with another number of processes draws its epochs from the same permutations.
"""
import numpy as np
import torch
from torch.utils.data import Sampler


def epoch_order(num_samples, seed, epoch):
    """The epoch's permutation of range(N), the same on every process: (N,) long on the CPU."""
    key = np.random.SeedSequence([int(seed) % 2**63, int(epoch)]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(key) % 2**63)
    return torch.randperm(num_samples, generator=generator)


def shard_indexes(num_samples, batch_size, rank, world_size, seed, epoch):
    """Process ``rank``'s indexes for the epoch, step after step: (steps · b,) long, b = batch_size / P."""
    if batch_size % world_size:
        raise ValueError(f"a global batch of {batch_size} does not split over {world_size} processes")
    share = batch_size // world_size
    steps = num_samples // batch_size  # whole global batches only (drop_last)
    order = epoch_order(num_samples, seed, epoch)[:steps * batch_size].view(steps, batch_size)  # (steps, B)
    return order[:, rank * share:(rank + 1) * share].reshape(-1)  # (steps · b,)


class ShardSampler(Sampler):
    """A DataLoader's sampler (batch_size = b, drop_last) for one of ``world_size`` processes.

    Args:
        num_samples: N, images in the data set.
        batch_size: B, the global batch of a step (all processes together).
        rank, world_size: this process and P.
        seed: the run's --seed; ``set_epoch`` picks the epoch's permutation.
    """

    def __init__(self, num_samples, batch_size, rank, world_size, seed):
        super().__init__()
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def indexes(self):
        return shard_indexes(self.num_samples, self.batch_size, self.rank, self.world_size, self.seed, self.epoch)

    def __iter__(self):
        return iter(self.indexes().tolist())

    def __len__(self):
        return self.num_samples // self.batch_size * (self.batch_size // self.world_size)
