"""A folder of image files as a data set, decoded once into a uint8 cache mapped from disk.

Layout, as torchvision's ImageFolder: each sub-folder of DIR is a class (sorted names give the
labels 0, 1, ...; sub-folders of a class belong to it), or a folder with no sub-folders is an
unlabelled set (every target -1; the number of classes to find, 2 <= K <= the number of images,
comes from the caller where clusters are made: ``check_cluster_count``).
Files and folders whose names start with "." are left out (the default cache lives in DIR/.cache).
In a labelled folder, files directly in DIR belong to no class and are left out with one warning.
Images are in the order ImageFolder gives: by class, then by path, sorted.

Decoding: any format and mode PIL reads (RGB, L, RGBA, P, CMYK, 16-bit, ...), the first frame of
an animation, turned upright by its EXIF orientation, converted to RGB with PIL (alpha is dropped:
transparent pixels keep their stored colour; 16-bit images are scaled to 8 bits), then resized as
the evaluation transform does (docs/method.md, "Data and augmentation"): the shorter side to
image_size (bilinear, antialiased), then the central image_size x image_size square. A file PIL
cannot read is skipped with one warning line naming it, and one line counts them at the end.

Cache: one ``.npy`` of (N, image_size, image_size, 3) uint8, written through
``np.lib.format.open_memmap`` to a temporary file and renamed into place, and a JSON describing
it: a signature of the folder (SHA-256 of every file's relative path, size and modification
time), image_size, class names, the skipped files, and the per-channel mean and std of the cached
images (computed in chunks), the size and SHA-256 of the cached images and a checksum (SHA-256)
of the JSON's own content. The next run scans the folder again (names and ``stat`` only) and
maps the cache when the signature matches; any added, removed or changed file rebuilds it. A
cache is trusted only when the checksum matches, its std is finite and positive and its images
hash as recorded (hashed once per process: one read of the cache); otherwise it is rebuilt, with
one warning line saying why. One cache per image_size can live side by side in the same folder.

Links are followed but never in a loop: see ``scan``.
"""
import functools
import glob
import hashlib
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from lib.errors import InputError

from .arrays import MappedImages, channel_stats, content_hash, read_record, usable_stats, write_record

CACHE_FORMAT = 2  # 2: the record holds the hash of its images and a checksum of itself
DEFAULT_CACHE = ".cache"  # inside the folder when no cache_dir is given


@dataclass
class FolderImages:
    """What ``load`` gives: images (``MappedImages``), targets (int64, -1 = unlabelled), file paths
    in the same order, class names (None for an unlabelled folder), the number of classes and the
    per-channel mean and std of the images."""
    data: MappedImages
    targets: np.ndarray
    paths: list
    class_names: tuple
    num_classes: int
    mean: tuple
    std: tuple


def printable(name):
    """``name`` (a file or class folder's name, a path) as text any picture, JSON file or CSV row can hold: bytes
    that are not UTF-8 (which Python keeps as surrogates) as ``\\xNN``, control characters (a newline) as
    their escapes; a name that needs none comes back unchanged."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def _hidden(name):
    return name.startswith(".")


def is_flat(folder):
    """True when ``folder`` keeps its images directly (unlabelled), without class sub-folders; one listing.
    As in ``scan``, a sub-folder that leads back to ``folder`` itself (a link) is no class folder."""
    if not os.path.isdir(folder):
        return False
    real = os.path.realpath(folder)
    return not any(e.is_dir() and not _hidden(e.name) and os.path.realpath(e.path) != real for e in os.scandir(folder))


def _reachable(path):
    """False for a link that leads nowhere or in a loop (to itself, or through links back to itself)."""
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _warn_broken(folder, broken):
    if broken:
        print(f"warning: left out {len(broken)} link(s) in {folder} that lead nowhere or back to themselves "
              f"(e.g. {broken[0]})", file=sys.stderr)


def _warn_loop(path, real):
    print(f"warning: left out the folder {path}: it leads to {real}, a folder already scanned (a link loop or a "
          f"second way in)", file=sys.stderr)


def _first_visit(path, seen):
    """True, once, for the first path leading to a folder; a later one (a loop, or a folder reached a
    second way) is left out with one warning line."""
    real = os.path.realpath(path)
    if real in seen:
        _warn_loop(path, real)
        return False
    seen.add(real)
    return True


def _walk(folder, name, seen, broken):
    """The (folder, sorted file names) pairs of class folder ``name``, following links to folders not
    in ``seen``; adds the links that lead nowhere to ``broken``."""
    walk = []
    for root, dirs, names in os.walk(os.path.join(folder, name), followlinks=True):
        dirs[:] = [d for d in sorted(dirs) if not _hidden(d) and _first_visit(os.path.join(root, d), seen)]
        reachable = []
        for n in sorted(n for n in names if not _hidden(n)):
            if _reachable(os.path.join(root, n)):
                reachable.append(n)
            else:
                broken.append(os.path.relpath(os.path.join(root, n), folder))
        walk.append((root, reachable))
    return walk


def scan(folder, skip=None):
    """Image candidates of ``folder`` in data set order: (relative paths, targets, class names or None).

    ``skip`` is a directory to leave out (a cache folder inside ``folder``). Raises InputError for a
    missing or empty folder and for a single class sub-folder.

    Links are followed but never in a loop: every folder is resolved once (``realpath``) and a
    folder that leads to one already scanned (DIR itself, a class folder, a folder seen before) is
    left out with one warning line; a link that leads nowhere or to itself is left out, with one
    warning line counting them.
    """
    if not os.path.isdir(folder):
        raise InputError(f"image folder {folder} does not exist or is not a folder")
    skip = None if skip is None else os.path.realpath(skip)
    entries = sorted((e for e in os.scandir(folder) if not _hidden(e.name)), key=lambda e: e.name)
    broken = [e.name for e in entries if not _reachable(e.path)]
    entries = [e for e in entries if e.name not in broken]
    seen = {os.path.realpath(folder)} | ({skip} if skip else set())  # the folders scanned or claimed
    classes = [e.name for e in entries if e.is_dir() and os.path.realpath(e.path) != skip
               and _first_visit(e.path, seen)]
    loose = [e.name for e in entries if not e.is_dir()]
    if not classes:
        _warn_broken(folder, broken)
        if not loose:
            raise InputError(f"image folder {folder} is empty: put the images in it, or one sub-folder per class")
        return loose, np.full(len(loose), -1, dtype=np.int64), None
    if len(classes) == 1:
        raise InputError(f"image folder {folder} has a single class sub-folder ({classes[0]}); a labelled folder "
                         f"needs two or more, an unlabelled one keeps its images directly in {folder}")
    if loose:
        print(f"warning: left out {len(loose)} file(s) directly in {folder} (e.g. {loose[0]}): a folder with class "
              f"sub-folders takes its images from them", file=sys.stderr)
    files, targets = [], []
    for label, name in enumerate(classes):
        walk = _walk(folder, name, seen, broken)
        before = len(files)
        for root, names in sorted(walk):  # ImageFolder's order: sorted (root, files) pairs
            files += [os.path.relpath(os.path.join(root, n), folder) for n in names]
        if len(files) == before:
            raise InputError(f"class sub-folder {os.path.join(folder, name)} has no files")
        targets += [label] * (len(files) - before)
    _warn_broken(folder, broken)
    return files, np.asarray(targets, dtype=np.int64), tuple(classes)


def signature(folder, files, image_size):
    """SHA-256 of the image size and every file's relative path, size and modification time (ns)."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT} image_size {image_size}\n".encode())
    for rel in files:
        st = os.stat(os.path.join(folder, rel))
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _resize(image_size):
    from torchvision import transforms  # here, not at import: torchvision costs a second or two to import

    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size)])


def decode(path, image_size):
    """One image file as (image_size, image_size, 3) uint8: upright, RGB, shorter side resized, centre crop."""
    with Image.open(path) as im, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. PIL's note on palette transparency, which we drop anyway
        # 16-bit grey: I;16, or I from a PNG (Pillow before 10.3 opens 16-bit PNGs as 32-bit I)
        deep = im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")
        im = ImageOps.exif_transpose(im)
        if deep:  # 16-bit: keep the top 8 bits' worth (PIL's convert would clip)
            im = Image.fromarray(np.round(np.asarray(im, dtype=np.float64) / 257.0).astype(np.uint8))
        im = im.convert("RGB")
    return np.asarray(_resize(image_size)(im), dtype=np.uint8)


def _reason(err, path):
    message = " ".join(str(err).replace(repr(path), "").replace(path, "").split())[:100]
    return f"{type(err).__name__}: {message}".rstrip(": ")


def _build(folder, files, image_size, cache_dir, digest):
    """Decode every file into a new ``.npy`` in ``cache_dir``; returns (npy path, count, skipped)."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".npy")
        os.close(fd)
    except OSError as err:
        raise InputError(f"cannot write the image cache of {folder} in {cache_dir} ({type(err).__name__}); "
                         f"give a writable cache folder") from None
    print(f"{folder}: decoding {len(files):,} file(s) to {image_size}x{image_size} images once, into {cache_dir}",
          flush=True)
    try:
        # room for every file; the skipped ones leave unused rows at the end (the JSON says how many are used)
        shape = (len(files), image_size, image_size, 3)
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        count, skipped = 0, []
        for rel in tqdm(files, desc="decode", unit="img", leave=False, disable=None):
            path = os.path.join(folder, rel)
            try:
                images[count] = decode(path, image_size)
            except Exception as err:  # any unreadable file is skipped, whatever the decoder raised
                print(f"warning: skipped {path}: not a readable image ({_reason(err, path)})", file=sys.stderr)
                skipped.append(rel)
                continue
            count += 1
        images.flush()
        del images
        npy = os.path.join(cache_dir, f"folder-{image_size}px-{digest[:16]}.npy")
        os.replace(tmp, npy)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if skipped:
        print(f"warning: skipped {len(skipped)} of {len(files)} files in {folder} (not readable images)",
              file=sys.stderr)
    return npy, count, skipped


def load(folder, image_size, cache_dir=None, num_classes=None):
    """The images of ``folder`` at image_size x image_size, from the cache or decoded into it first.

    ``num_classes``: for an unlabelled folder the number of classes (K >= 2), or None where no
    clusters are made (stage 1). Where clusters are made (stage-2 training) ``check_cluster_count``
    also asks K <= the number of images; predicting with K trained clusters takes any number of
    images. A labelled folder's class count is its number of sub-folders, and a num_classes
    that differs from it is an error rather than an override (the labels could not score such a
    clustering class by class). Returns ``FolderImages``.
    """
    folder = os.fspath(folder)
    cache_dir = os.path.join(folder, DEFAULT_CACHE) if cache_dir is None else os.fspath(cache_dir)
    files, targets, class_names = scan(folder, skip=cache_dir)
    _check_class_count(folder, class_names, num_classes)

    digest = signature(folder, files, image_size)
    record_path = os.path.join(cache_dir, f"folder-{image_size}px.json")
    record, problem = _read_record(record_path, digest, cache_dir)
    if problem:
        print(f"warning: the image cache {record_path} {problem}; decoding the folder again", file=sys.stderr)
    if record is None:
        record = _build_record(folder, files, class_names, image_size, cache_dir, digest, record_path)
    elif record["skipped"]:
        print(f"warning: {len(record['skipped'])} of {record['files']} files in {folder} are not readable images "
              f"and stay left out (listed in {record_path})", file=sys.stderr)

    skipped = set(record["skipped"])
    keep = np.array([rel not in skipped for rel in files], dtype=bool)
    targets = targets[keep]
    if class_names is not None:
        empty = [name for label, name in enumerate(class_names) if not (targets == label).any()]
        if empty:
            raise InputError(f"class sub-folder {os.path.join(folder, empty[0])} has no readable images")
    paths = [os.path.join(folder, rel) for rel, kept in zip(files, keep) if kept]
    data = MappedImages.from_npy(os.path.join(cache_dir, record["npy"]), record["images"])
    shown = None if class_names is None else tuple(printable(name) for name in class_names)  # names to show
    return FolderImages(data, targets, paths, shown, len(class_names) if class_names else num_classes,
                        tuple(record["mean"]), tuple(record["std"]))


def _build_record(folder, files, class_names, image_size, cache_dir, digest, record_path):
    """Decode the folder into a new cache and write its JSON (with the hash of its images); the record."""
    npy, count, skipped = _build(folder, files, image_size, cache_dir, digest)
    if count == 0:
        os.remove(npy)
        raise InputError(f"image folder {folder} has no readable images ({len(files)} files skipped)")
    images = MappedImages.from_npy(npy, count)
    mean, std = channel_stats(images)
    if not usable_stats(mean, std):
        os.remove(npy)
        raise InputError(f"the images of {folder} cannot be normalized: a colour channel has std "
                         f"{min(std):.3g} (every image the same colour there?); add varied images")
    record = {"format": CACHE_FORMAT, "folder": os.path.abspath(folder), "signature": digest,
              "image_size": image_size, "files": len(files), "images": count, "npy": os.path.basename(npy),
              "class_names": None if class_names is None else list(class_names), "skipped": skipped,
              "mean": mean, "std": std, "content": {"bytes": images.array.nbytes, "sha256": content_hash(images)}}
    write_record(record_path, record)
    _VERIFIED.add(_identity(npy, record))
    for stale in glob.glob(os.path.join(cache_dir, f"folder-{image_size}px-*.npy")):
        if stale != npy:  # an earlier build of this folder (or of another one) at this size
            os.remove(stale)
    return record


def check_cluster_count(num_classes, images, folder):
    """Where clusters are made from an unlabelled folder (stage-2 training; ``images`` after --subset):
    K given, and 2 <= K <= its number of images. One-line InputErrors."""
    if num_classes is None:
        raise InputError(f"image folder {folder} has no class sub-folders (unlabelled images): pass "
                         f"--num_classes K, the number of classes to find (K >= 2)")
    if num_classes < 2:
        raise InputError(f"--num_classes must be at least 2 for an unlabelled folder, not {num_classes}")
    if num_classes > images:
        raise InputError(f"--num_classes {num_classes} is more than the {images} images of {folder}: "
                         f"--num_classes is at most the number of images")


def _check_class_count(folder, class_names, num_classes):
    """An unlabelled folder takes K >= 2 clusters (or none yet); a labelled one takes its count from its
    sub-folders."""
    if class_names is None:
        if num_classes is not None and num_classes < 2:
            raise InputError(f"--num_classes must be at least 2 for an unlabelled folder, not {num_classes}")
    elif num_classes is not None and num_classes != len(class_names):
        raise InputError(f"--num_classes {num_classes} contradicts the {len(class_names)} class sub-folders of "
                         f"{folder}; leave it out for a labelled folder")


# the caches whose images were hashed in this process: (path, size, mtime, inode, hash) -> checked once
_VERIFIED = set()


def _identity(npy, record):
    st = os.stat(npy)
    return os.path.realpath(npy), st.st_size, st.st_mtime_ns, st.st_ino, record["content"]["sha256"]


def _read_record(path, digest, cache_dir):
    """(the cache's JSON, None) when it describes this folder as it is now (``arrays.read_record``: whole, a
    sound std) and its images are those it was built with; else (None, why not) for a cache that cannot be
    trusted (a line for a warning), or (None, None) for none, an older format or a folder that changed since
    (rebuilt silently).

    The images are hashed (SHA-256 of the used rows) once per process and cache file."""
    record, problem = read_record(path, lambda r: r.get("format") == CACHE_FORMAT and r.get("signature") == digest)
    if record is None:
        return None, problem
    try:
        npy = os.path.join(cache_dir, record["npy"])
        images = MappedImages.from_npy(npy, record["images"])
        if images.array.nbytes != record["content"]["bytes"]:  # fewer rows than recorded map fewer bytes
            return None, f"does not match its images {record['npy']} (another shape)"
        identity = _identity(npy, record)
        if identity not in _VERIFIED:
            if content_hash(images) != record["content"]["sha256"]:
                return None, f"does not match its images {record['npy']} (their hash differs: corrupted)"
            _VERIFIED.add(identity)
        return record, None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"does not match its images ({type(err).__name__})"
