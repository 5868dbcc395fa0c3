"""Build the embedded default dataset: a small class-balanced Fashion-MNIST subset.

The subset lets `examples/run.py` train and evaluate with no arguments and no network. It is
built from the official IDX files (Debian: `apt-get install dataset-fashion-mnist`) with a
seeded draw, so the same command always selects the same images:

    python examples/make_default_dataset.py

Train images come from the official training set and validation images from the official
test set, so the two never overlap. Each split is written as a parquet file with a
`datasets.Image` column `image` (greyscale 28x28 PNG) and a `ClassLabel` column `label`; the
features travel in the parquet schema metadata, so `datasets.load_dataset("parquet", ...)`
gives back the class names. Each image keeps its provenance in its `path` field
(`train-01234.png` is image 1234 of the official training file).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import struct
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEFAULT_SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "data" / "fashion_mnist_small"
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def read_idx_images(path: Path) -> np.ndarray:
    """Read an IDX3 image file as uint8 (N, rows, cols); the magic number guards against swapped files."""
    with gzip.open(path, "rb") as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != IDX_IMAGES_MAGIC:
            raise ValueError(f"{path}: magic {magic} is not an IDX image file ({IDX_IMAGES_MAGIC})")
        data = np.frombuffer(f.read(), dtype=np.uint8)
    return data.reshape(count, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    """Read an IDX1 label file as int64 (N,)."""
    with gzip.open(path, "rb") as f:
        magic, count = struct.unpack(">II", f.read(8))
        if magic != IDX_LABELS_MAGIC:
            raise ValueError(f"{path}: magic {magic} is not an IDX label file ({IDX_LABELS_MAGIC})")
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != count:
        raise ValueError(f"{path}: header says {count} labels, file holds {data.size}")
    return data.astype(np.int64)


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `per_class` indices of every class, then shuffle so any prefix stays roughly balanced."""
    picks = []
    for cls in range(len(FASHION_MNIST_CLASSES)):
        candidates = np.flatnonzero(labels == cls)
        if candidates.size < per_class:
            raise ValueError(f"class {cls} has {candidates.size} images, fewer than {per_class}")
        picks.append(np.sort(rng.choice(candidates, size=per_class, replace=False)))
    return rng.permutation(np.concatenate(picks))


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode one greyscale image as PNG; PNG is lossless, so the pixels are exactly the official ones."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def build_split(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, prefix: str) -> datasets.Dataset:
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)}
    )
    rows = {
        "image": [{"bytes": png_bytes(images[i]), "path": f"{prefix}-{i:05d}.png"} for i in indices],
        "label": [int(labels[i]) for i in indices],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source_dir",
        type=Path,
        default=DEFAULT_SOURCE_DIR,
        help="folder with the official Fashion-MNIST *-idx*-ubyte.gz files",
    )
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--train_per_class", type=int, default=200)
    parser.add_argument("--validation_per_class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    sources = {
        "train": ("train", args.train_per_class),
        "validation": ("t10k", args.validation_per_class),
    }
    for split, (prefix, per_class) in sources.items():
        images = read_idx_images(args.source_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx_labels(args.source_dir / f"{prefix}-labels-idx1-ubyte.gz")
        indices = balanced_indices(labels, per_class, rng)
        out = args.output_dir / f"{split}.parquet"
        build_split(images, labels, indices, prefix).to_parquet(str(out))
        print(f"{out}: {len(indices)} images, {out.stat().st_size} bytes, sha256 {sha256(out)}")


if __name__ == "__main__":
    main()
