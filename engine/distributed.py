"""Several processes under torchrun: plain functions around ``torch.distributed`` (docs/method.md, "Several processes").

    torchrun --nproc_per_node 4 super_and.py --dataset cifar10 --batch_size 128     # 32 images per process

Without a launcher (no WORLD_SIZE in the environment, or WORLD_SIZE=1) the run is one process and every
function here returns its input or does nothing, so the single-process numbers stay bit for bit those of a
plain ``python super_and.py``. With P processes:

- ``--batch_size`` B is the global batch: process r takes B/P images of each step (``split_batch``) from one
  shuffle of the data set shared by all (``datasets.sharding.ShardSampler``), and ``start_epoch`` derives
  each epoch's shuffle from (seed, epoch) and each process's own random streams (its augmentations) from
  (seed, epoch, rank), so a run resumed with the same P repeats the uninterrupted run.
- ``gather_views`` turns every process's (2b, d) features [view 1; view 2] (b = B/P) into the global (2B, d)
  [all view 1; all view 2], with gradients; every process then computes the same global loss. The gather's
  backward sums each row's gradient over the P identical losses (P times the gradient of one loss) and
  DistributedDataParallel divides the parameter gradients by P: together the single-process gradient.
- Evaluation splits the loader's batches over the processes and gathers the features in loader order
  (``compute_features_sharded``); rank 0 alone writes files and prints (others print to /dev/null).
- Each round's neighbourhood discovery is split over the processes: ``ProcessGroup`` gives the method's
  ``AnchorNeighbourhoods.discover`` the process group's collective operations, with which every process
  computes a share of the O(N²) entropy and of the anchors' neighbours, and all end with the same anchors.
"""
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from datasets.processes import rank, world_size
from lib.collectives import Collectives
from lib.errors import InputError

from .system import choose_device, seed_everything


def _launched():
    """torchrun sets WORLD_SIZE; one process under it is the single-process run."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_environment(rank, world_size, port, host="127.0.0.1"):
    """The variables torchrun gives process ``rank`` of ``world_size`` on one machine (what ``init`` reads),
    for tests and benchmarks that start the processes themselves."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": host,
            "MASTER_PORT": str(port)}


def is_main():
    """Rank 0: the process that writes checkpoints, logs and pictures, and prints."""
    return rank() == 0


def init(device_name="auto"):
    """The process's device, chosen once; under torchrun with P > 1 also join the process group.

    One process: ``choose_device(device_name)``, nothing else. Several: CUDA (``auto`` where present, or
    ``cuda``) gives process LOCAL_RANK the device cuda:LOCAL_RANK and the NCCL backend; ``cpu`` gives gloo.
    The other ranks' standard output goes to /dev/null (errors stay on standard error).
    """
    if not _launched():
        return choose_device(device_name)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_name)
    if device.type == "cuda":
        if device_name not in ("auto", "cuda"):
            raise InputError(f"--device {device_name} names one GPU for {os.environ['WORLD_SIZE']} processes; "
                             "pass --device cuda (process i takes cuda:LOCAL_RANK)")
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                             "start at most that many processes per machine (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise InputError(f"several processes run on CUDA (NCCL) or the CPU (gloo), not {device.type}")
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return device


def cleanup():
    """Leave the process group (a no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if world_size() > 1:
        dist.barrier()


# ---- the global batch ----

@torch.no_grad()
def gather(tensor):
    """Every process's ``tensor`` concatenated along dim 0 in rank order, no gradient (the batch's indexes)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _GatherWithGradient(torch.autograd.Function):
    """All processes' rows in rank order (all_gather along dim 0). Backward: each process's gradient of the
    gathered rows, summed over the processes, and this process's own rows of that sum (a reduce-scatter,
    written as all_reduce and a slice so that gloo runs it as NCCL does)."""

    @staticmethod
    def forward(ctx, rows):
        return gather(rows)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # (P·n, ...): all_reduce writes in place
        dist.all_reduce(grad)
        rows = grad.shape[0] // world_size()
        return grad[rank() * rows:(rank() + 1) * rows]


def gather_views(features):
    """(2b, d) rows of this process, [view 1; view 2] of its b images -> the global (2B, d) rows
    [view 1 of every process in rank order; view 2 likewise], with gradients (one process: ``features``).

    The backward sums the gradient that every process's loss gives each row (as
    ``torch.distributed.nn.functional.all_gather`` does); all processes compute the same loss, so a row
    receives P times the gradient of the global loss, and DDP's average over the P processes restores the
    single-process gradient.
    """
    if world_size() == 1:
        return features
    half = features.shape[0] // 2
    every = _GatherWithGradient.apply(features).view(world_size(), 2, half, *features.shape[1:])  # (P, 2, b, d)
    return every.transpose(0, 1).reshape(features.shape[0] * world_size(), *features.shape[1:])  # (2B, d)


def average(tensor):
    """The mean over processes of a per-process number (a logged loss); the tensor itself for one process."""
    if world_size() == 1:
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor)
    return tensor / world_size()


def total(*numbers):
    """Python numbers summed over processes (counts); unchanged for one process."""
    if world_size() == 1:
        return numbers
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    sums = torch.tensor(numbers, dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return tuple(type(number)(summed) for number, summed in zip(numbers, sums.tolist()))


# ---- the model ----

def wrap(model, sync_bn=False):
    """DistributedDataParallel around ``model`` for several processes (the model itself for one).

    BatchNorm keeps each process's statistics over its own 2b rows, as the released DataParallel had them
    per device; its running statistics are rank 0's (DDP broadcasts rank 0's buffers before each forward,
    as DataParallel kept device 0's). ``sync_bn`` (CUDA only) converts the BatchNorm layers in place to
    SyncBatchNorm: statistics over the whole global batch, as one device computes them.
    """
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    if sync_bn:
        if device.type != "cuda":
            raise InputError("--sync_bn synchronizes BatchNorm across GPUs; it needs CUDA (several processes on "
                             "the CPU keep per-process statistics)")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the top module: parameters are shared
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def speed_options(net, channels_last=False, compile=False, sync_bn=False):
    """Apply --channels_last and --compile to ``net`` and, with several processes, wrap it in
    DistributedDataParallel (with --sync_bn: synchronized BatchNorm); returns (net, model): train with
    ``model``, save ``net`` (a compiled or wrapped module's state dict would carry a prefix)."""
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = wrap(net, sync_bn)  # ``net`` itself for one process
    return net, (torch.compile(model) if compile else model)


def broadcast_object(obj, src=0):
    """``obj`` of process ``src`` (picklable; tensors travel on the CPU) on every process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_tensor(tensor, src=0):
    """Overwrite ``tensor`` in place with process ``src``'s (same shape on every process); returns it."""
    if world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


@torch.no_grad()
def broadcast_state(module, src=0):
    """Every parameter and buffer of ``module`` from process ``src``: state drawn at construction (the
    memory bank, the frozen heads) or running statistics, identical on all processes whatever each drew."""
    for tensor in module.state_dict().values():
        broadcast_tensor(tensor, src)
    return module


@torch.no_grad()
def broadcast_buffers(module, src=0):
    """``module``'s buffers (BatchNorm's running statistics) from process ``src``: after training, where each
    process updated its own from its own rows, evaluation uses rank 0's everywhere (the ones it saves)."""
    for buffer in module.buffers():
        broadcast_tensor(buffer, src)
    return module


class ProcessGroup(Collectives):
    """The collective operations of the process group, for the method's functions that split their work
    (``AnchorNeighbourhoods.discover``): ``part`` is (rank, processes); one process does nothing."""

    @property
    def part(self):
        return rank(), world_size()

    @torch.no_grad()
    def broadcast(self, tensor):
        if world_size() == 1:
            return tensor
        return broadcast_tensor(tensor.detach().clone())  # the caller's tensor (the bank) stays its own

    @torch.no_grad()
    def all_reduce_sum(self, tensor):
        if world_size() > 1:
            dist.all_reduce(tensor)
        return tensor

    @torch.no_grad()
    def gather_rows(self, tensor):
        if world_size() == 1:
            return tensor
        counts = gather(torch.tensor([len(tensor)], device=tensor.device)).tolist()
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))  # all_gather takes equal shapes
        padded[:len(tensor)] = tensor
        every = gather(padded).view(world_size(), *padded.shape)
        return torch.cat([rows[:count] for rows, count in zip(every, counts)])


def main_decides(check):
    """``check()`` on rank 0 alone (it takes the run folder: lock, files). What it raises is raised on every
    process (an InputError as the same InputError), so none is left waiting for the others."""
    if world_size() == 1:
        return check()
    error = None
    if is_main():
        try:
            check()
        except Exception as err:  # re-raised below, after the others know
            error = err
    outcome = broadcast_object(None if error is None else (isinstance(error, InputError), str(error)))
    if error is not None:
        raise error
    if outcome is not None:
        raise (InputError if outcome[0] else RuntimeError)(outcome[1])


# ---- random streams and epochs ----

def derived_seed(*keys):
    """A 63-bit seed from integers (the run's seed, the epoch, the rank), by NumPy's SeedSequence."""
    return int(np.random.SeedSequence([int(key) % 2**63 for key in keys]).generate_state(1, np.uint64)[0]) % 2**63


def start_epoch(loader, seed, epoch):
    """Several processes: the epoch's shuffle from (seed, epoch), the same on every process, and this
    process's own random streams from (seed, epoch, rank). One process: nothing (its streams run on, and a
    checkpoint's RNG state continues them)."""
    if world_size() == 1:
        return
    loader.sampler.set_epoch(epoch)
    seed_everything(derived_seed(seed, epoch, rank()))


# ---- evaluation ----

def shard(loader):
    """This process's share of an evaluation loader: batches rank, rank + P, ... of the same batches (so
    every image meets the network in the same batch as in one process). One process: ``loader``."""
    if world_size() == 1:
        return loader
    batches = list(torch.utils.data.BatchSampler(range(len(loader.dataset)), loader.batch_size, drop_last=False))
    return torch.utils.data.DataLoader(loader.dataset, batch_sampler=batches[rank()::world_size()],
                                       num_workers=loader.num_workers, pin_memory=loader.pin_memory)


@torch.no_grad()
def gather_shards(rows, num_rows, batch_size):
    """The (n_r, d) rows ``shard`` gave this process -> all ``num_rows`` rows in loader order."""
    if world_size() == 1:
        return rows
    processes = world_size()
    num_batches = -(-num_rows // batch_size)
    longest = -(-num_batches // processes) * batch_size  # rows of the process with the most batches
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(processes)]
    dist.all_gather(parts, padded)
    row = torch.arange(num_rows, device=rows.device)
    batch, within = row // batch_size, row % batch_size
    # row g sits in batch g // bs, which process (g // bs) % P holds as its ((g // bs) // P)-th batch
    source = (batch % processes) * longest + (batch // processes) * batch_size + within
    return torch.cat(parts)[source]


def compute_features_sharded(net, loader, device, amp=False):
    """``lib.protocols.compute_features`` over the processes: rank 0's BatchNorm running statistics on
    every process, each process its share of the batches, all features gathered in loader order."""
    from lib.protocols import compute_features  # scikit-learn comes with it: imported only when evaluating
    if world_size() == 1:
        return compute_features(net, loader, device, amp)
    broadcast_buffers(net)
    mine = shard(loader)
    rows = compute_features(net, mine, device, amp) if len(mine) else None  # a process may have no batch
    shape, dtype = broadcast_object(None if rows is None else (tuple(rows.shape[1:]), rows.dtype))  # rank 0 has one
    if rows is None:
        rows = torch.empty((0, *shape), dtype=dtype, device=device)
    return gather_shards(rows, len(loader.dataset), loader.batch_size)
