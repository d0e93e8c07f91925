"""The loaders (datasets/loaders.py): training loaders shuffle and drop the last partial batch, evaluation
loaders keep order, and ``--gpu_augment``'s loader yields the same batches' keys.
"""
from types import SimpleNamespace

import pytest
import torch

import datasets

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
