"""Write scikit-learn's bundled digits as an ImageFolder tree of PNG files (no download).

    python examples/imagefolder/make_images.py imagefolder-data

gives `imagefolder-data/{train,test}/<digit>/<n>.png`: 16x16 grayscale images (the 8x8
digits scaled up), 80% train and 20% test, the same files on every machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make_images(root: str | Path, *, per_class: int | None = None) -> Path:
    """Write the tree under `root` (at most `per_class` images of each class per split)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.kron(images, np.ones((1, 2, 2), dtype=np.uint8))  # 8x8 -> 16x16
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    for split, idx in (("train", order[:cut]), ("test", order[cut:])):
        counts: dict[int, int] = {}
        for i in sorted(idx.tolist()):
            label = int(digits.target[i])
            if per_class is not None and counts.get(label, 0) >= per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder to write (train/ and test/ go under it)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="at most this many images per class and split (default: all)")
    args = parser.parse_args()
    root = make_images(args.root, per_class=args.per_class)
    count = sum(1 for _ in root.rglob("*.png"))
    print(f"wrote {count} PNG files under {root}/train and {root}/test")


if __name__ == "__main__":
    main()
