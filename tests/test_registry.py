"""The registry (datasets/registry.py): one entry per data set with its facts, its splits, ``same_images``,
and ``build_dataset`` / ``from_args`` checking what they are given.
"""
import dataclasses

import numpy as np
import pytest
from data_files import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

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
    assert set(datasets.DATASETS) == {"cifar10", "cifar100", "cifar20", "stl10", "fashion-mnist", "digits", "folder"}
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
    assert all(splits[n] == ("train", "train", "test") for n in ("cifar10", "cifar100", "cifar20", "digits"))
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
