"""Write a split of a built-in data set as a folder of PNG files, one sub-folder per class (or flat).

    python tools/export_image_folder.py --dataset fashion-mnist --split test --count 2000 --out data/fashion-folder
    python tools/export_image_folder.py --dataset digits --flat --out data/digits-flat

The result is what `--dataset folder --data_dir OUT` reads: a way to try the own-images path on known data.
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root

import datasets


def main(args):
    data = datasets.build_dataset(args.dataset, args.data_dir, args.split)
    count = min(args.count or len(data), len(data))
    names = data.class_names
    for i in range(count):
        folder = args.out if args.flat else os.path.join(args.out, names[int(data.targets[i])])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.asarray(data.data[i])).save(os.path.join(folder, f"{i:06d}.png"))
    print(f"wrote {count} images to {args.out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=[n for n in datasets.DATASETS if n != "folder"])
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--split", default="train")
    p.add_argument("--count", type=int, default=0, help="the first N images (0: all)")
    p.add_argument("--flat", action="store_true", help="no class sub-folders (unlabelled)")
    p.add_argument("--out", required=True)
    main(p.parse_args())
