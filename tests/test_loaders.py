"""The loaders (datasets/loaders.py): training loaders shuffle and drop the last partial batch, evaluation
loaders keep order, ``--gpu_augment``'s loader yields the same batches' keys, and under torchrun the data
code reads the process group from torch.distributed (datasets/processes.py).
"""
import json
import multiprocessing
import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

import datasets
from datasets import processes
from datasets.sharding import epoch_order, shard_indexes
from lib.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


def test_train_loader_shuffles_and_drops_last():
    torch.manual_seed(3)
    ds = datasets.build_dataset("digits", ".", "train", views=2, subset=50)
    loader = datasets.make_loader(ds, batch_size=16, train=True, workers=0, device=torch.device("cpu"))
    batches = list(loader)
    assert len(loader) == 3 and len(batches) == 3
    indices = torch.cat([b["index"] for b in batches])
    assert len(indices) == 48 and len(set(indices.tolist())) == 48
    assert set(indices.tolist()) <= set(range(50))
    assert indices.tolist() != sorted(indices.tolist())
    for batch in batches:
        assert set(batch) == {"view1", "view2", "target", "index"}
        assert batch["view1"].shape == batch["view2"].shape == (16, 3, 32, 32)
        assert torch.equal(batch["target"], ds.targets[batch["index"]])


def test_eval_loader_keeps_order():
    ds = datasets.build_dataset("digits", ".", "test", subset=50)
    loader = datasets.make_loader(ds, batch_size=16, train=False, workers=0, device=torch.device("cpu"))
    batches = list(loader)
    assert all(set(b) == {"image", "target", "index"} for b in batches)
    assert [len(b["index"]) for b in batches] == [16, 16, 16, 2]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(50))
    assert torch.equal(torch.cat([b["target"] for b in batches]), ds.targets)
    assert not loader.pin_memory
    cuda_loader = datasets.make_loader(ds, batch_size=16, train=False, workers=0, device=torch.device("cuda"))
    assert cuda_loader.pin_memory


def test_gpu_augment_train_loader_yields_the_same_keys_and_size():
    ds = datasets.build_dataset("digits", ".", "train", views=2, subset=40, image_size=24)
    args = SimpleNamespace(gpu_augment=True, batch_size=8, workers=0)
    batch = next(iter(datasets.make_train_loader(ds, args, torch.device("cpu"))))
    assert set(batch) == {"view1", "view2", "target", "index"}
    assert batch["view1"].shape == batch["view2"].shape == (8, 3, 24, 24)
    assert torch.equal(batch["target"], ds.targets[batch["index"]])
    plain = datasets.make_train_loader(ds, SimpleNamespace(gpu_augment=False, batch_size=8, workers=0),
                                       torch.device("cpu"))
    assert isinstance(plain, torch.utils.data.DataLoader) and set(next(iter(plain))) == set(batch)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_worker(rank, port, out_dir):
    """One of two gloo processes, as torchrun starts them: what the data code sees of the group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    marker = os.path.join(out_dir, "written-by-rank-0")
    record = {"rank": processes.rank(), "world": processes.world_size(), "share": processes.split_batch(8)}
    try:
        processes.split_batch(7)
    except InputError as err:
        record["odd"] = str(err)

    def prepare():  # rank 0 writes what the others then read (a download, a cache)
        if rank == 0:
            with open(marker, "w") as f:
                f.write("ready")
        return os.path.exists(marker)
    record["saw_rank_0"] = processes.main_first(prepare)

    def fail_on_rank_0():
        if rank == 0:
            raise InputError("rank 0 failed")
        return "others still ran"
    try:
        record["after_failure"] = processes.main_first(fail_on_rank_0)
    except InputError as err:
        record["after_failure"] = str(err)
    ds = datasets.ImageDataset(np.zeros((20, 8, 8, 3), dtype=np.uint8), torch.arange(20),
                               datasets.eval_transform((0.5,) * 3, (0.5,) * 3, 8), image_size=8)
    loader = datasets.make_loader(ds, batch_size=8, train=True, workers=0, device=torch.device("cpu"), seed=3)
    record["indexes"] = torch.cat([b["index"] for b in loader]).tolist()
    record["batch"] = loader.batch_size
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


def test_two_processes_read_rank_and_world_from_torch_distributed(tmp_path):
    """Under torchrun (two forked gloo processes) the data code takes rank and world size from
    torch.distributed: each process's share of the global batch and of one shuffle, and rank 0 first."""
    context = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [context.Process(target=_two_process_worker, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    records = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            records.append(json.load(f))
    assert [(r["rank"], r["world"], r["share"], r["batch"]) for r in records] == [(0, 2, 4, 4), (1, 2, 4, 4)]
    assert all("--batch_size 7" in r["odd"] and "2 processes" in r["odd"] for r in records)
    assert [r["saw_rank_0"] for r in records] == [True, True]  # rank 1 built after rank 0 had written
    assert [r["after_failure"] for r in records] == ["rank 0 failed", "others still ran"]
    expected = [shard_indexes(20, 8, rank, 2, seed=3, epoch=0).tolist() for rank in range(2)]
    assert [r["indexes"] for r in records] == expected
    assert sorted(expected[0] + expected[1]) == sorted(epoch_order(20, 3, 0)[:16].tolist())
