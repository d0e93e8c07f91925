"""The process group as the data code sees it, read from ``torch.distributed`` alone.

Without a launcher (or before the script joins the group) this is one process: rank 0 of 1, and
every function here does what a single process would. Under torchrun the scripts join the group
before they read any data, so these give the same rank and world size as the rest of the run.
"""
import torch.distributed as dist

from lib.errors import InputError


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def split_batch(batch_size):
    """This process's share of the global ``--batch_size``; it must divide evenly."""
    processes = world_size()
    if batch_size % processes:
        raise InputError(f"--batch_size {batch_size} (images per step for the whole job) does not split evenly "
                         f"across {processes} processes; pass a multiple of {processes}")
    return batch_size // processes


def main_first(build):
    """``build()`` on rank 0 first, then on the others (a download or a cache is written once); if rank 0
    fails, the others try too and fail with the same one-line error rather than waiting."""
    if world_size() == 1:
        return build()
    if rank() == 0:
        try:
            return build()
        finally:
            dist.barrier()
    dist.barrier()
    return build()
