"""uint8 image arrays that stay on disk, and per-channel statistics read from them in chunks.

A data set's ``data`` is (N, H, W, 3) uint8. The small sets (CIFAR, Fashion-MNIST, digits) are
numpy arrays in memory. STL-10's binary files and a folder's decoded cache are mapped from disk
(``np.memmap``) instead: 100,000 STL-10 images (2.8 GB) or a million cached folder images cost no
memory beyond the pages in use, which the operating system may drop again.

``MappedImages`` (one file) and ``ConcatImages`` (several arrays read as one, e.g. STL-10's
train+unlabeled) index like a numpy array along the first axis: ``x[i]`` is one (H, W, 3) image,
``x[a:b]`` stays on disk, ``x[index_array]`` reads those images; they have ``shape``, ``dtype``,
``ndim`` and ``len``, and ``np.asarray(x)`` reads everything into memory. They pickle as file names
and offsets, not pixels, so a DataLoader worker started by spawn or forkserver maps the file itself
instead of receiving a copy.
"""
import bisect
import hashlib
import json
import os
import sys
import tempfile

import numpy as np

from lib.errors import InputError


def _is_row_slice(key):
    return isinstance(key, slice) and key.step in (None, 1)


class MappedImages:
    """(N, H, W, 3) uint8 images mapped from a file, opened on first access in each process.

    The file holds a C-order uint8 array of ``stored_shape`` from byte ``offset`` on; ``axes``
    transposes it to (N, H, W, 3) (None: stored that way); ``rows`` = (start, stop) keeps a range
    of its first axis.
    """

    def __init__(self, path, stored_shape, offset=0, axes=None, rows=None):
        self.path = os.fspath(path)
        self.stored_shape = tuple(int(s) for s in stored_shape)
        self.offset = int(offset)
        self.axes = None if axes is None else tuple(axes)
        start, stop = rows if rows is not None else (0, self.stored_shape[0])
        self.rows = (int(start), int(stop))
        full = self.stored_shape if self.axes is None else tuple(self.stored_shape[a] for a in self.axes)
        self.shape = (self.rows[1] - self.rows[0],) + full[1:]
        self._array = None

    @classmethod
    def from_npy(cls, path, count=None):
        """A ``.npy`` file of (M, H, W, 3) uint8, its first ``count`` images (all when None)."""
        header = np.load(path, mmap_mode="r")  # reads the header only
        if header.dtype != np.uint8 or header.ndim != 4 or not header.flags["C_CONTIGUOUS"]:
            raise ValueError(f"{path} is not a C-order uint8 (N, H, W, C) array")
        return cls(path, header.shape, header.offset, rows=(0, header.shape[0] if count is None else count))

    @property
    def array(self):
        """The images as a read-only ``np.memmap`` view (mapped on first use)."""
        if self._array is None:
            if self.shape[0] == 0:  # mmap cannot map zero bytes
                self._array = np.zeros(self.shape, dtype=np.uint8)
            else:
                stored = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=self.stored_shape)
                if self.axes is not None:
                    stored = stored.transpose(self.axes)
                self._array = stored[self.rows[0]:self.rows[1]]
        return self._array

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if _is_row_slice(key):  # a range of images stays a mapped file
            start, stop, _ = key.indices(len(self))
            stop = max(start, stop)
            return MappedImages(self.path, self.stored_shape, self.offset, self.axes,
                                (self.rows[0] + start, self.rows[0] + stop))
        return self.array[key]

    def __array__(self, dtype=None, copy=None):
        return np.array(self.array, dtype=dtype)

    def __getstate__(self):
        return dict(self.__dict__, _array=None)  # the file's name, not its pixels

    def __repr__(self):
        return f"MappedImages({self.path!r}, shape={self.shape})"


class ConcatImages:
    """Several (N_i, H, W, 3) uint8 arrays (numpy, ``MappedImages``) indexed as their concatenation."""

    def __init__(self, parts):
        self.parts = list(parts)
        tails = {tuple(p.shape[1:]) for p in self.parts}
        if len(tails) != 1:
            raise ValueError(f"cannot concatenate images of shapes {sorted(tails)}")
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))  # starts[i] = first row of part i; last = N
        self.shape = (self.starts[-1],) + tails.pop()

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):  # the first entry picks images, the rest index inside them
            picked = self[key[0]]
            inner = key[1:] if isinstance(key[0], (int, np.integer)) else (slice(None),) + key[1:]
            return np.asarray(picked)[inner]
        if isinstance(key, (int, np.integer)):
            index = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= index < len(self):
                raise IndexError(f"index {int(key)} is out of bounds for {len(self)} images")
            part = bisect.bisect_right(self.starts, index) - 1
            return self.parts[part][index - self.starts[part]]
        if _is_row_slice(key):
            start, stop, _ = key.indices(len(self))
            pieces = [part[max(start - lo, 0):max(min(stop, hi) - lo, 0)]
                      for part, lo, hi in zip(self.parts, self.starts, self.starts[1:]) if lo < stop and hi > start]
            if not pieces:
                return self.parts[0][0:0]  # an empty range
            return pieces[0] if len(pieces) == 1 else ConcatImages(pieces)
        # index arrays (and masks, strided slices): gather from each part, keep the order asked for
        index = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = np.where(index < 0, index + len(self), index)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"an index is out of bounds for {len(self)} images")
        out = np.empty(index.shape + self.shape[1:], dtype=np.uint8)
        for part, lo, hi in zip(self.parts, self.starts, self.starts[1:]):
            inside = (index >= lo) & (index < hi)
            if inside.any():
                out[inside] = part[index[inside] - lo]
        return out

    def __array__(self, dtype=None, copy=None):
        return np.concatenate([np.asarray(p) for p in self.parts]).astype(dtype or np.uint8, copy=False)

    def __repr__(self):
        return f"ConcatImages({self.parts!r})"


def channel_stats(images, chunk=1024):
    """Per-channel mean and (population) standard deviation of uint8 (N, H, W, 3) images, on the
    [0, 1] scale ToTensor gives, as two 3-tuples of floats.

    Reads ``chunk`` images at a time and counts byte values (one histogram of 256 bins per
    channel), so the result is exact and the same for any chunk size, and memory stays at one chunk.
    """
    hist = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start:start + chunk])  # (chunk, H, W, 3)
        for c in range(3):
            hist[c] += np.bincount(block[..., c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    count = hist.sum(axis=1)  # (3,)
    mean = (hist * values).sum(axis=1) / count
    std = np.sqrt((hist * (values - mean[:, None]) ** 2).sum(axis=1) / count)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def write_json_atomic(path, record):
    """Write ``record`` to ``path`` atomically (a temporary file renamed into place)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def content_hash(images, chunk=4096):
    """SHA-256 (hex) of the bytes of uint8 (N, H, W, 3) images in C order, read ``chunk`` images at a
    time: the same for an array in memory and for a mapped file holding the same pixels."""
    digest = hashlib.sha256(f"uint8 {tuple(int(s) for s in images.shape)}\n".encode())
    for start in range(0, len(images), chunk):
        digest.update(np.ascontiguousarray(np.asarray(images[start:start + chunk])).data)
    return digest.hexdigest()


def record_checksum(record):
    """SHA-256 (hex) of a cache record's content: every entry but "checksum", as canonical JSON."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def usable_stats(mean, std):
    """True when ``mean`` and ``std`` are three finite numbers each and every std is positive: a
    normalization that can divide by it."""
    try:
        mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return (mean.shape == std.shape == (3,) and bool(np.isfinite(mean).all()) and bool(np.isfinite(std).all())
            and bool((std > 0).all()))


def read_record(path, current):
    """A cached record (a JSON object with its normalization, "mean" and "std", and a checksum of its content)
    as (record, None) when ``current(record)`` holds (made from the files there are now), the checksum matches
    and every std is finite and positive; (None, None) for none, or one that is not current (replaced
    silently); (None, why not) for one that cannot be trusted, for a warning line."""
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, "is not readable JSON"
    if not isinstance(record, dict):
        return None, "is not a JSON record"
    if not current(record):
        return None, None
    if record.get("checksum") != record_checksum(record):
        return None, "does not match its checksum (edited, corrupted or written by an older version)"
    if not usable_stats(record.get("mean"), record.get("std")):
        return None, "holds a std that is not finite and positive"
    return record, None


def write_record(path, record):
    """Write ``record`` with its checksum (``read_record`` checks it), atomically."""
    write_json_atomic(path, {**record, "checksum": record_checksum(record)})


def cached_normalization(name, places, signature, parts, load_images, where):
    """Per-channel mean and std (3-tuples, [0, 1] scale) of a data set's training images, from the first
    trustworthy record of ``places`` (``read_record``; an untrustworthy one gets one warning line),
    else computed over ``load_images()`` (exact, ``channel_stats``) and cached in the first writable
    place (none writable: one warning, computed again on every run). ``where`` names the files for the
    error on images whose std is zero."""
    for place in places:
        record, problem = read_record(place, lambda record: record.get("files") == signature)
        if record is not None:
            return tuple(record["mean"]), tuple(record["std"])
        if problem:
            print(f"warning: {name}: the cached normalization {place} {problem}; computing it again", file=sys.stderr)
    images = load_images()
    print(f"{name}: computing the mean and std of the {len(images):,} training images (once)", flush=True)
    mean, std = channel_stats(images)
    if not usable_stats(mean, std):
        raise InputError(f"the {name} training images in {where} have a colour channel of std {min(std):.3g}: "
                         f"not the real data; download {name} again")
    record = {"images": len(images), "parts": list(parts), "files": signature, "mean": mean, "std": std}
    for place in places:
        try:
            write_record(place, record)
            break
        except OSError:
            continue
    else:
        print(f"warning: {name}: could not cache the normalization in {' or '.join(places)}; it is computed again "
              f"on every run", file=sys.stderr)
    return mean, std
