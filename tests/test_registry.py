"""The registry (datasets/registry.py): one entry per data set with its facts, its splits, ``same_images``,
and ``build_dataset`` / ``from_args`` checking what they are given.
"""
import dataclasses
import os
from types import SimpleNamespace

import numpy as np
import pytest
from data_files import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, write_stl10
from PIL import Image
from torchvision import transforms

import datasets
from lib.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


def test_cifar_constants_and_class_counts_match_reference():
    assert tuple(datasets.DATASETS["cifar10"].mean) == CIFAR10_MEAN
    assert tuple(datasets.DATASETS["cifar10"].std) == CIFAR10_STD
    for name in ("cifar100", "cifar20"):
        assert tuple(datasets.DATASETS[name].mean) == CIFAR100_MEAN
        assert tuple(datasets.DATASETS[name].std) == CIFAR100_STD
    expected = {"cifar10": 10, "cifar100": 100, "cifar20": 20, "stl10": 10, "fashion-mnist": 10, "digits": 10}
    assert {name: datasets.DATASETS[name].num_classes for name in expected} == expected


def test_dataset_descriptions():
    assert set(datasets.DATASETS) == {"cifar10", "cifar100", "cifar20", "stl10", "svhn", "fashion-mnist", "digits",
                                      "folder"}
    for name, info in datasets.DATASETS.items():
        assert info.name == name
        if name != "folder":
            assert len(info.class_names) == info.num_classes and len(set(info.class_names)) == info.num_classes
    with pytest.raises(dataclasses.FrozenInstanceError):
        datasets.DATASETS["cifar10"].num_classes = 3
    assert datasets.DATASETS["cifar10"].class_names[:2] == ("airplane", "automobile")
    assert datasets.DATASETS["cifar20"].class_names[9] == "large_man-made_outdoor_things"
    assert datasets.DATASETS["stl10"].class_names == ("airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                      "monkey", "ship", "truck")
    assert datasets.DATASETS["fashion-mnist"].class_names[9] == "Ankle boot"
    splits = {name: (i.embed_split, i.cluster_split, i.test_split) for name, i in datasets.DATASETS.items()}
    assert splits["stl10"] == ("train+unlabeled", "train+test", "test")
    assert splits["folder"] == ("train", "train", None)
    assert all(splits[n] == ("train", "train", "test") for n in ("cifar10", "cifar100", "cifar20", "svhn", "digits"))
    assert {n for n, i in datasets.DATASETS.items() if i.augmentation != "flip"} == {"svhn"}  # an affine, no flip
    folder_info = datasets.DATASETS["folder"]
    assert folder_info.num_classes is None and folder_info.mean is None and folder_info.class_names is None
    assert datasets.DATASETS["stl10"].mean is None  # computed from its training images


def test_joined_splits_concatenate_in_order(digits_train, digits_test):
    ds = datasets.build_dataset("digits", ".", "train+test")
    assert len(ds) == 1797 and isinstance(ds.data, np.ndarray)
    assert np.array_equal(ds.data, np.concatenate([digits_train[0], digits_test[0]]))
    assert ds.targets.tolist() == digits_train[1].tolist() + digits_test[1].tolist()
    reverse = datasets.build_dataset("digits", ".", "test+train", subset=301)
    assert np.array_equal(reverse.data[:300], digits_test[0]) and np.array_equal(reverse.data[300], digits_train[0][0])


@pytest.mark.parametrize("split, fragment", [("unlabeled", "no split 'unlabeled'"), ("train+train", "twice"),
                                             ("val", "train, test"), ("", "no split ''")])
def test_bad_split_raises_input_error(split, fragment):
    with pytest.raises(InputError) as err:
        datasets.build_dataset("digits", ".", split)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_num_classes_must_not_contradict_a_labelled_data_set():
    assert datasets.build_dataset("digits", ".", "test", num_classes=10, subset=2).num_classes == 10
    with pytest.raises(InputError) as err:
        datasets.build_dataset("digits", ".", "test", num_classes=20)
    assert "--num_classes 20" in str(err.value) and "10" in str(err.value)


def test_unknown_data_set_raises_input_error():
    with pytest.raises(InputError) as err:
        datasets.build_dataset("imagenet", ".", "train")
    assert "imagenet" in str(err.value) and "cifar10" in str(err.value)


@pytest.mark.parametrize("subset", [0, -3])
def test_bad_subset_raises_input_error(subset):
    with pytest.raises(InputError) as err:
        datasets.build_dataset("digits", ".", "train", subset=subset)
    assert "subset" in str(err.value)


def test_same_images():
    """cifar20 is CIFAR-100's images under their superclass labels: an encoder of one is an encoder of the other."""
    assert datasets.DATASETS["cifar20"].images_of == "cifar100"
    assert datasets.same_images("cifar20", "cifar100") and datasets.same_images("cifar100", "cifar20")
    assert all(datasets.same_images(name, name) for name in datasets.DATASETS)
    assert not datasets.same_images("cifar10", "cifar100") and not datasets.same_images("cifar10", "cifar20")
    assert not datasets.same_images("stl10", "cifar10") and not datasets.same_images("folder", "digits")
    assert datasets.same_images("imagenet", "imagenet") and not datasets.same_images("imagenet", "cifar100")
    for info in datasets.DATASETS.values():  # one level: the data set named owns its images
        if info.images_of is not None:
            assert info.images_of in datasets.DATASETS and datasets.DATASETS[info.images_of].images_of is None


def flags(**overrides):
    base = dict(dataset="digits", data_dir=".", subset=4, image_size=32, num_classes=None, model_dir=None)
    return SimpleNamespace(**{**base, **overrides})


def test_from_args_normalization_override_is_the_transforms(digits_train):
    args = flags()
    before = dict(vars(args))
    mean, std = [0.25, 0.5, 0.75], [0.5, 0.25, 0.125]
    ds = datasets.from_args(args, "train", normalization={"mean": mean, "std": std})
    assert ds.mean == (0.25, 0.5, 0.75) and ds.std == (0.5, 0.25, 0.125)
    image = ds[2]["image"]  # (3, 32, 32): the evaluation transform of the 32x32 image leaves every pixel in place
    for y, x in ((0, 0), (16, 12), (20, 9), (31, 31)):
        pixel = digits_train[0][2, y, x]  # uint8 (3,)
        by_hand = [(int(pixel[c]) / 255 - mean[c]) / std[c] for c in range(3)]
        assert image[:, y, x].tolist() == pytest.approx(by_hand, abs=1e-6)
    assert image[:, 16, 12].tolist() != pytest.approx(datasets.from_args(args, "train")[2]["image"][:, 16, 12].tolist())
    two = datasets.from_args(args, "train", views=2, normalization={"mean": mean, "std": std})
    norm = two.transform.transforms[-1]
    assert type(two.transform.transforms[0]) is transforms.RandomResizedCrop
    assert tuple(norm.mean) == (0.25, 0.5, 0.75) and tuple(norm.std) == (0.5, 0.25, 0.125)
    assert vars(args) == before  # nothing written into the caller's flags


@pytest.mark.parametrize("given", [{"mean": [0.5] * 3}, {"mean": [0.5] * 3, "std": [0.2, 0.2]},
                                   {"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}, [0.5, 0.2]])
def test_bad_normalization_raises_input_error(given):
    with pytest.raises(InputError) as err:
        datasets.build_dataset("digits", ".", "train", subset=2, normalization=given)
    assert "normalization" in str(err.value) and "\n" not in str(err.value)


def test_from_args_num_classes_override_for_a_flat_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    args = flags(dataset="folder", data_dir=str(folder), subset=None, image_size=8, model_dir=str(tmp_path / "run"))
    before = dict(vars(args))
    assert datasets.from_args(args, "train").num_classes is None  # stage 1 makes no clusters: no K needed
    ds = datasets.from_args(args, "train", num_classes=4)
    assert ds.num_classes == 4 and len(ds) == 3 and not ds.has_labels
    assert vars(args) == before
    (cache,) = os.listdir(tmp_path / "run" / "cache")  # the run folder's cache of this image folder
    assert cache.startswith("flat-")
    assert datasets.from_args(flags(dataset="folder", data_dir=str(folder), subset=None, image_size=8,
                                    model_dir=None, num_classes=9), "train", num_classes=2).num_classes == 2


def test_given_normalization_is_not_computed(tmp_path):
    """STL-10's statistics are computed from its training images; a given normalization replaces them
    without that pass over the images (nothing is computed or cached)."""
    write_stl10(str(tmp_path))
    ds = datasets.build_dataset("stl10", tmp_path, "test", normalization={"mean": (0.5,) * 3, "std": (0.25,) * 3})
    assert ds.mean == (0.5,) * 3 and ds.std == (0.25,) * 3
    assert not os.path.exists(tmp_path / "stl10_binary" / "normalization.json")
    assert datasets.build_dataset("stl10", tmp_path, "test").mean != ds.mean
    assert os.path.exists(tmp_path / "stl10_binary" / "normalization.json")
