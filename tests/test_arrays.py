"""Images on disk (datasets/arrays.py): mapped .npy files and their concatenation index like numpy,
pickle as file names, and give exact per-channel statistics.
"""
import pickle

import numpy as np
import pytest

from datasets import arrays
from datasets.arrays import ConcatImages, MappedImages

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


@pytest.fixture
def mapped(tmp_path):
    """Three arrays of 4, 0 and 5 images: one in memory, two mapped .npy files; and their concatenation."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 256, size=(n, 3, 2, 3), dtype=np.uint8) for n in (4, 0, 5))
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "c.npy", c)
    parts = [a, MappedImages.from_npy(str(tmp_path / "b.npy")), MappedImages.from_npy(str(tmp_path / "c.npy"))]
    return np.concatenate([a, b, c]), ConcatImages(parts)


def test_concatenated_images_index_like_numpy(mapped):
    full, cat = mapped
    assert cat.shape == full.shape == (9, 3, 2, 3) and len(cat) == 9 and cat.dtype == np.uint8 and cat.ndim == 4
    assert np.array_equal(np.asarray(cat), full)
    for i in (0, 3, 4, 8, -1, -9):
        assert np.array_equal(cat[i], full[i])
    for sl in (slice(None), slice(2, 7), slice(4, 9), slice(0, 4), slice(5, 6), slice(-3, None), slice(6, 2)):
        assert np.array_equal(np.asarray(cat[sl]), full[sl]), sl
    for index in ([8, 0, 4, 4], np.array([[1, 5], [7, 2]]), [-1], []):
        assert np.array_equal(cat[index], full[index])
    mask = np.arange(9) % 2 == 0
    assert np.array_equal(cat[mask], full[mask]) and np.array_equal(cat[::3], full[::3])
    assert np.array_equal(cat[2, 1], full[2, 1]) and np.array_equal(cat[3:6, :, 1], full[3:6, :, 1])
    for bad in (9, -10, [0, 9]):
        with pytest.raises(IndexError):
            cat[bad]


def test_mapped_images_stay_on_disk_and_pickle_small(mapped, tmp_path):
    full, cat = mapped
    part = cat[5:8]  # inside the mapped file c.npy
    assert isinstance(part, MappedImages) and np.array_equal(np.asarray(part), full[5:8])
    assert isinstance(part[1:], MappedImages) and np.array_equal(np.asarray(part[1:]), full[6:8])
    big = np.zeros((2000, 32, 32, 3), dtype=np.uint8)
    big[1234] = 7
    np.save(tmp_path / "big.npy", big)
    images = MappedImages.from_npy(str(tmp_path / "big.npy"), count=1500)
    assert images.shape == (1500, 32, 32, 3) and images[1234].max() == 7
    blob = pickle.dumps(images)
    assert len(blob) < 1000  # the file's name, not its 4.6 MB of pixels
    again = pickle.loads(blob)
    assert again.shape == images.shape and np.array_equal(again[1230:1240], big[1230:1240])


def test_channel_stats_are_exact_for_any_chunk(mapped):
    full, cat = mapped
    expected_mean = (full / 255.0).mean(axis=(0, 1, 2))
    expected_std = (full / 255.0).std(axis=(0, 1, 2))
    for chunk in (1, 2, 4, 100):
        mean, std = arrays.channel_stats(cat, chunk=chunk)
        assert np.allclose(mean, expected_mean, atol=1e-12) and np.allclose(std, expected_std, atol=1e-12)
        assert all(isinstance(v, float) for v in mean + std)
