"""ImageDataset (datasets/images.py): items of one or two views, their transforms, attributes and subsets."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import datasets

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


def test_two_view_items(digits_train):
    torch.manual_seed(0)
    ds = datasets.build_dataset("digits", ".", "train", views=2, subset=20)
    assert ds.views == 2
    for index in (0, 7, 19):
        item = ds[index]
        assert set(item) == {"view1", "view2", "target", "index"}
        v1, v2 = item["view1"], item["view2"]
        for v in (v1, v2):
            assert isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.shape == (3, 32, 32)
        assert not torch.equal(v1, v2)
        assert item["index"] == index and item["target"] == int(digits_train[1][index])
        assert isinstance(item["target"], int)


def test_two_view_item_is_the_training_transform_twice_view1_first():
    """Same images, same transforms in the same order: a seed gives the same numbers as before."""
    ds = datasets.build_dataset("digits", ".", "train", views=2, subset=10)
    info = datasets.DATASETS["digits"]
    torch.manual_seed(5)
    item = ds[3]
    torch.manual_seed(5)
    transform, image = datasets.train_transform(info.mean, info.std), Image.fromarray(ds.data[3])
    assert torch.equal(item["view1"], transform(image)) and torch.equal(item["view2"], transform(image))


def test_eval_items_deterministic_and_normalized(digits_test):
    ds = datasets.build_dataset("digits", ".", "test")
    assert ds.views == 1 and len(ds) == 300
    mean, std = datasets.DATASETS["digits"].mean, datasets.DATASETS["digits"].std
    manual = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    for index in (0, 123, 299):
        a, b = ds[index], ds[index]
        assert set(a) == {"image", "target", "index"}
        assert torch.equal(a["image"], b["image"])
        assert a["image"].dtype == torch.float32 and a["image"].shape == (3, 32, 32)
        assert torch.allclose(a["image"], manual(Image.fromarray(digits_test[0][index])), atol=1e-6)
        by_hand = (torch.from_numpy(digits_test[0][index]).permute(2, 0, 1).float() / 255
                   - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        assert torch.allclose(a["image"], by_hand, atol=1e-5)
        assert a["target"] == int(digits_test[1][index]) and a["index"] == index


def test_dataset_attributes(digits_train):
    ds = datasets.build_dataset("digits", ".", "train")
    assert ds.num_classes == 10 and ds.class_names == [str(d) for d in range(10)] and ds.has_labels
    assert ds.mean == datasets.DATASETS["digits"].mean and ds.std == datasets.DATASETS["digits"].std
    assert ds.paths is None and ds.image_size == 32 and ds.targets.dtype == torch.long
    ds.targets[4] = -1
    assert not ds.has_labels  # one image without a label is enough


@pytest.mark.parametrize("train", [True, False])
def test_subset_keeps_first_images(digits_train, digits_test, train):
    x, y = digits_train if train else digits_test
    ds = datasets.build_dataset("digits", ".", "train" if train else "test", subset=37)
    assert len(ds) == 37
    assert np.array_equal(ds.data, x[:37])
    assert ds.targets.tolist() == y[:37].tolist()
    assert ds.data.flags["C_CONTIGUOUS"]
    # a subset larger than the split keeps the whole split
    assert len(datasets.build_dataset("digits", ".", "train" if train else "test", subset=10_000)) == len(x)


def test_explicit_transform_is_used():
    ds = datasets.build_dataset("digits", ".", "train", views=2, transform=transforms.ToTensor(), subset=3)
    item = ds[0]
    assert torch.equal(item["view1"], item["view2"]) and item["view1"].min() >= 0 and item["view1"].max() <= 1
