"""The training augmentation and the evaluation transform (datasets/transforms.py; docs/method.md,
"Data and augmentation") against the released code's, and the image size they give.
"""
import numpy as np
import pytest
from data_files import CIFAR10_MEAN, CIFAR10_STD
from torchvision import transforms

import datasets
from lib.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


WITH_CONSTANTS = [name for name, info in datasets.DATASETS.items() if info.mean is not None]


@pytest.mark.parametrize("name", WITH_CONSTANTS)
def test_train_transform_matches_reference(name):
    info = datasets.DATASETS[name]
    steps = datasets.train_transform(info.mean, info.std).transforms
    assert [type(t) for t in steps] == [transforms.RandomResizedCrop, transforms.ColorJitter,
                                        transforms.RandomGrayscale, transforms.RandomHorizontalFlip,
                                        transforms.ToTensor, transforms.Normalize]
    crop, jitter, grey, flip, _, norm = steps
    assert tuple(crop.size) == (32, 32)
    assert tuple(crop.scale) == (0.2, 1.0)
    assert np.allclose(crop.ratio, (3 / 4, 4 / 3))  # torchvision's default, as released
    assert np.allclose(jitter.brightness, (0.6, 1.4))
    assert np.allclose(jitter.contrast, (0.6, 1.4))
    assert np.allclose(jitter.saturation, (0.6, 1.4))
    assert np.allclose(jitter.hue, (-0.4, 0.4))
    assert grey.p == 0.2
    assert flip.p == 0.5
    assert tuple(norm.mean) == tuple(info.mean)
    assert tuple(norm.std) == tuple(info.std)
    if name == "cifar10":
        assert tuple(norm.mean) == CIFAR10_MEAN and tuple(norm.std) == CIFAR10_STD


@pytest.mark.parametrize("name", WITH_CONSTANTS)
def test_eval_transform_matches_reference(name):
    info = datasets.DATASETS[name]
    steps = datasets.eval_transform(info.mean, info.std).transforms
    assert [type(t) for t in steps] == [transforms.Resize, transforms.CenterCrop,
                                        transforms.ToTensor, transforms.Normalize]
    resize, crop, _, norm = steps
    assert resize.size in (32, [32], (32,))
    assert tuple(crop.size) == (32, 32)
    assert tuple(norm.mean) == tuple(info.mean)
    assert tuple(norm.std) == tuple(info.std)


def test_default_transforms_follow_views():
    two = datasets.build_dataset("digits", ".", "train", views=2, subset=2)
    one = datasets.build_dataset("digits", ".", "train", views=1, subset=2)
    assert type(two.transform.transforms[0]) is transforms.RandomResizedCrop
    assert type(one.transform.transforms[0]) is transforms.Resize
    assert tuple(two.transform.transforms[0].size) == (32, 32) and tuple(one.transform.transforms[1].size) == (32, 32)


def test_image_size_sets_both_transforms():
    crop = datasets.train_transform((0.5,) * 3, (0.2,) * 3, image_size=64).transforms[0]
    assert tuple(crop.size) == (64, 64) and tuple(crop.scale) == (0.2, 1.0)
    resize, centre = datasets.eval_transform((0.5,) * 3, (0.2,) * 3, image_size=64).transforms[:2]
    assert resize.size in (64, [64], (64,)) and tuple(centre.size) == (64, 64)
    two = datasets.build_dataset("digits", ".", "train", views=2, subset=3, image_size=48)
    one = datasets.build_dataset("digits", ".", "test", subset=3, image_size=48)
    assert two[0]["view1"].shape == two[0]["view2"].shape == (3, 48, 48) and two.image_size == 48
    assert one[0]["image"].shape == (3, 48, 48)
    # the images themselves are unchanged: 32x32 upsampled by the transforms
    assert one.data.shape == (3, 32, 32, 3)


@pytest.mark.parametrize("size", [0, -32, 2.5, "32", True])
def test_bad_image_size_raises_input_error(size):
    with pytest.raises(InputError) as err:
        datasets.build_dataset("digits", ".", "train", image_size=size)
    assert "image_size" in str(err.value)
