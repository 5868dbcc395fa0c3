"""Data loading, checks and transforms on tiny image folders and parquet datasets built in tmp_path."""

from __future__ import annotations

import collections
import io
import json
import pickle
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from PIL import Image

from hf_adafilter.data.images import check_images, decode_image, to_rgb
from hf_adafilter.data.loading import (
    DEFAULT_DATASET_DIR,
    DataError,
    load_default_dataset,
    load_image_classification_data,
)
from hf_adafilter.data.transforms import (
    Augmentation,
    build_transforms,
    collate_fn,
    random_resized_crop_box,
)

CLASSES = ("bird", "cat", "dog")
MODES = ("RGB", "RGBA", "P", "L", "I;16")
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


def make_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return rgb.convert(mode)


def write_folder(root: Path, classes=CLASSES, per_class: int = 10, seed: int = 0) -> Path:
    """<root>/<class>/<i>.png in rotating modes and sizes (some non-square)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = make_image(MODES[i % len(MODES)], 20 + 3 * i, 16 + 2 * c, seed=seed + 100 * c + i)
            image.save(root / name / f"{i:02d}.png")
    return root


def write_parquet_dataset(root: Path, splits: dict[str, dict], features: dict) -> Path:
    """A local dataset folder (<split>.parquet) whose schema metadata declares `features` verbatim.

    Writing the metadata by hand lets a test store labels that `datasets` itself would refuse.
    """
    root.mkdir(parents=True, exist_ok=True)
    for split, columns in splits.items():
        path = root / f"{split}.parquet"
        plain = {k: v for k, v in features.items() if v.get("_type") != "ClassLabel"}
        plain |= {
            k: {"dtype": "int64", "_type": "Value"}
            for k, v in features.items()
            if v.get("_type") == "ClassLabel"
        }
        datasets.Dataset.from_dict(columns, features=datasets.Features.from_dict(plain)).to_parquet(str(path))
        table = pq.read_table(path)
        metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
        pq.write_table(table.replace_schema_metadata(metadata), path)
    return root


def png_bytes(seed: int, mode: str = "RGB") -> dict:
    import io

    buffer = io.BytesIO()
    make_image(mode, 12, 10, seed).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": f"{seed}.png"}


IMAGE_FEATURE = {"_type": "Image"}


def class_label(*names: str) -> dict:
    return {"names": list(names), "_type": "ClassLabel"}


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture
def train_dir(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "train")


def load(cache: str, **kwargs) -> object:
    return load_image_classification_data(cache_dir=cache, **kwargs)


def mobilenet_processor(**kwargs) -> transformers.MobileNetV2ImageProcessorPil:
    kwargs = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}} | kwargs
    return transformers.MobileNetV2ImageProcessorPil(**kwargs)


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def test_image_folders_share_one_label_set(tmp_path, train_dir, cache):
    validation_dir = write_folder(tmp_path / "val", classes=("cat", "dog"), per_class=3, seed=7)
    data = load(cache, train_dir=train_dir, validation_dir=validation_dir)
    assert (data.image_column, data.label_column) == ("image", "label")
    assert data.labels == list(CLASSES)
    assert data.id2label == {0: "bird", 1: "cat", 2: "dog"}
    assert data.label2id == {"bird": 0, "cat": 1, "dog": 2}
    assert (len(data.train), len(data.validation), data.test) == (30, 6, None)
    assert data.validation.features["label"].names == list(CLASSES)
    assert sorted(collections.Counter(data.validation["label"])) == [1, 2]
    # Stored undecoded so a transform can name a file PIL cannot read.
    assert data.train.features["image"] == datasets.Image(decode=False)
    assert decode_image(data.train[0]["image"]).size[0] >= 20


def test_carved_validation_is_stratified_and_reproducible(train_dir, cache):
    first = load(cache, train_dir=train_dir, train_val_split=0.3, seed=3)
    again = load(cache, train_dir=train_dir, train_val_split=0.3, seed=3)
    other = load(cache, train_dir=train_dir, train_val_split=0.3, seed=4)
    assert (len(first.train), len(first.validation)) == (21, 9)
    assert collections.Counter(first.validation["label"]) == {0: 3, 1: 3, 2: 3}

    def paths(split):
        return [row["path"] for row in split["image"]]

    assert paths(first.validation) == paths(again.validation)
    assert paths(first.validation) != paths(other.validation)
    assert not set(paths(first.train)) & set(paths(first.validation))


def test_no_split_and_max_samples(train_dir, cache):
    data = load(cache, train_dir=train_dir, train_val_split=None, max_train_samples=7)
    assert data.validation is None and len(data.train) == 7
    assert load(cache, train_dir=train_dir, max_eval_samples=2).validation.num_rows == 2
    with pytest.raises(DataError, match="no validation split"):
        data.require("validation")
    # --max_eval_samples is validation's; the test split has its own --max_predict_samples, as in HF's scripts.
    split = load(cache, train_dir=train_dir, test_dir=train_dir, max_eval_samples=2)
    assert (split.validation.num_rows, split.test.num_rows) == (2, 30)
    assert load(cache, train_dir=train_dir, test_dir=train_dir, max_predict_samples=3).test.num_rows == 3


def test_named_dataset_autodetects_columns_and_splits(tmp_path, cache):
    rows = {"id": ["a", "b", "c", "d"], "img": [png_bytes(i) for i in range(4)], "fine_label": [0, 1, 2, 1]}
    root = write_parquet_dataset(
        tmp_path / "hub",
        {"train": rows, "val": rows, "test": rows},
        {
            "id": {"dtype": "string", "_type": "Value"},
            "img": IMAGE_FEATURE,
            "fine_label": class_label("x", "y", "z"),
        },
    )
    data = load(cache, dataset_name=str(root))
    assert (data.image_column, data.label_column, data.labels) == ("img", "fine_label", ["x", "y", "z"])
    assert [len(s) for s in (data.train, data.validation, data.test)] == [4, 4, 4]


def integer_label_dataset(root: Path, train: list[int], test: list[int]) -> Path:
    return write_parquet_dataset(
        root,
        {
            "train": {"picture": [png_bytes(i) for i in range(len(train))], "target": train},
            "test": {"picture": [png_bytes(i) for i in range(len(test))], "target": test},
        },
        {"picture": IMAGE_FEATURE, "target": {"dtype": "int32", "_type": "Value"}},
    )


def test_integer_labels_without_class_label_become_one(tmp_path, cache):
    root = integer_label_dataset(tmp_path / "ints", [0, 2, 1, 2, 0, 1], [0, 2, 1, 2, 0, 1])
    data = load(cache, dataset_name=str(root), image_column_name="picture", train_val_split=0.5)
    assert data.labels == ["0", "1", "2"]
    assert data.train.features["target"] == datasets.ClassLabel(names=["0", "1", "2"])


@pytest.mark.parametrize(
    ("train", "test", "message"),
    [
        (
            [0, 1000, 0, 1000],
            [0, 1000],
            r"train split are not 0..1000: 999 ids never occur \(\[1, 2, 3, 4, 5\]",
        ),
        (
            [0, 1, 0, 1],
            [0, 99],
            r"test split holds ids \[99\] that the train split does not have \(it has 0..1\)",
        ),
    ],
)
def test_integer_labels_with_holes_or_beyond_train_are_refused(tmp_path, cache, train, test, message):
    root = integer_label_dataset(tmp_path / "ints", train, test)
    with pytest.raises(DataError, match=message):
        load(cache, dataset_name=str(root), image_column_name="picture", train_val_split=None)


def test_every_unreadable_image_is_named_before_training(tmp_path, cache):
    train = write_folder(tmp_path / "train")
    (train / "bird" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (train / "cat" / "empty.jpg").write_bytes(b"")
    data = load(cache, train_dir=train, train_val_split=None)
    with pytest.raises(
        DataError, match=r"2 image\(s\) cannot be read: .*(broken.png.*empty.jpg|empty.jpg.*broken.png)"
    ):
        check_images(data, ["train"])
    check_images(data, ["validation", "test"])  # absent splits: nothing to check


def test_a_truncated_jpeg_that_passes_verify_is_caught_by_the_full_decode(tmp_path, cache):
    train = write_folder(tmp_path / "train")
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        photo, "JPEG"
    )
    truncated = photo.getvalue()[: len(photo.getvalue()) // 2]
    with Image.open(io.BytesIO(truncated)) as image:
        image.verify()  # the header-only check the scan used to make: passes
    (train / "cat" / "half.jpg").write_bytes(truncated)
    data = load(cache, train_dir=train, train_val_split=None)
    with pytest.raises(DataError, match=r"1 image\(s\) cannot be read: .*half.jpg.*--skip_image_check"):
        check_images(data, ["train"], workers=2)


def test_class_folders_without_images_and_nested_folders_are_warned_about(tmp_path, cache, caplog):
    train = write_folder(tmp_path / "train")
    (train / "empty").mkdir()
    nested = train / "bird" / "more"
    nested.mkdir()
    make_image("RGB", 20, 20, seed=7).save(nested / "x.png")
    with caplog.at_level("WARNING", logger="hf_adafilter.data"):
        load(cache, train_dir=train, train_val_split=None)
    assert "class folder 'empty' has no images" in caplog.text
    assert "nested folders ['bird/more']" in caplog.text


def test_withheld_test_labels_drop_only_the_test_split(tmp_path, cache):
    train = {"image": [png_bytes(i) for i in range(4)], "label": [0, 1, 0, 1]}
    test = {"image": [png_bytes(9), png_bytes(8)], "label": [-1, -1]}
    root = write_parquet_dataset(
        tmp_path / "withheld",
        {"train": train, "test": test},
        {"image": IMAGE_FEATURE, "label": class_label("a", "b")},
    )
    data = load(cache, dataset_name=str(root), train_val_split=0.5)
    assert data.test is None and (len(data.train), len(data.validation)) == (2, 2)


def test_embedded_fashion_mnist_subset(cache):
    data = load_default_dataset(cache_dir=cache)
    assert data.labels == FASHION_MNIST_CLASSES
    assert (len(data.train), len(data.validation), data.test) == (2000, 500, None)
    assert collections.Counter(data.train["label"]) == {c: 200 for c in range(10)}
    assert collections.Counter(data.validation["label"]) == {c: 50 for c in range(10)}
    image = decode_image(data.validation[0]["image"])
    assert (image.mode, image.size) == ("L", (28, 28))
    assert sum(f.stat().st_size for f in DEFAULT_DATASET_DIR.iterdir()) < 2_000_000


# ------------------------------------------------------------------------------------------
# Bad data: every case is a DataError that names the culprit
# ------------------------------------------------------------------------------------------


def test_no_source_and_two_sources(tmp_path, train_dir, cache):
    with pytest.raises(DataError, match="--dataset_name.*--train_dir"):
        load(cache)
    with pytest.raises(DataError, match="pass one source"):
        load(cache, dataset_name="beans", train_dir=train_dir)


def test_bad_folders(tmp_path, train_dir, cache):
    with pytest.raises(DataError, match=r"--train_dir .*missing: no such directory"):
        load(cache, train_dir=tmp_path / "missing")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"--validation_dir .*empty: no image files"):
        load(cache, train_dir=train_dir, validation_dir=tmp_path / "empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    make_image("RGB", 8, 8, 0).save(flat / "a.png")
    with pytest.raises(DataError, match="one sub-folder per class"):
        load(cache, train_dir=flat)


def test_validation_class_missing_from_train(tmp_path, train_dir, cache):
    validation_dir = write_folder(tmp_path / "val", classes=("cat", "emu"), per_class=2)
    with pytest.raises(
        DataError, match=r"class 'emu' appears in --validation_dir .*val.* no images in --train_dir"
    ):
        load(cache, train_dir=train_dir, validation_dir=validation_dir)


def test_missing_columns(train_dir, cache):
    with pytest.raises(
        DataError, match=r"column 'photo' not found.*\['image', 'label'\].*--image_column_name"
    ):
        load(cache, train_dir=train_dir, image_column_name="photo")
    with pytest.raises(DataError, match=r"column 'species' not found.*--label_column_name"):
        load(cache, train_dir=train_dir, label_column_name="species")


def test_no_image_column_found_or_not_images(tmp_path, cache):
    rows = {"file": ["a.png", "b.png"], "label": [0, 1]}
    root = write_parquet_dataset(
        tmp_path / "paths",
        {"train": rows},
        {"file": {"dtype": "string", "_type": "Value"}, "label": class_label("a", "b")},
    )
    with pytest.raises(DataError, match=r"found no image column.*\['file', 'label'\].*--image_column_name"):
        load(cache, dataset_name=str(root))
    with pytest.raises(DataError, match=r"column 'file' .*holds Value\('string'\), not images"):
        load(cache, dataset_name=str(root), image_column_name="file")


@pytest.mark.parametrize(
    ("feature", "values", "message"),
    [
        (class_label("a", "b"), [0, -1], r"label column 'label' .*negative label -1"),
        (
            class_label("a", "b"),
            [0, 5],
            r"label column 'label' .*holds label 5, out of range for its 2 class names",
        ),
        ({"dtype": "int64", "_type": "Value"}, [1, -3], r"label column 'label' .*negative label -3"),
        (
            {"dtype": "string", "_type": "Value"},
            ["a", "b"],
            r"label column 'label' .*Value\('string'\).*class_encode",
        ),
        ({"dtype": "float32", "_type": "Value"}, [0.5, 1.0], r"label column 'label' .*Value\('float32'\)"),
    ],
    ids=["negative", "out-of-range", "negative-int", "strings", "floats"],
)
def test_bad_labels(tmp_path, cache, feature, values, message):
    root = write_parquet_dataset(
        tmp_path / "labels",
        {"train": {"image": [png_bytes(0), png_bytes(1)], "label": values}},
        {"image": IMAGE_FEATURE, "label": feature},
    )
    with pytest.raises(DataError, match=message):
        load(cache, dataset_name=str(root), train_val_split=None)


def test_splits_with_different_class_names(monkeypatch, cache):
    # Parquet folders unify features across splits, so hand the loader a DatasetDict directly.
    def split(*names):
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))}
        )
        return datasets.Dataset.from_dict(
            {"image": [png_bytes(0), png_bytes(1)], "label": [0, 1]}, features=features
        )

    loaded = datasets.DatasetDict(train=split("a", "b"), test=split("b", "a"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: loaded)
    with pytest.raises(DataError, match=r"classes \['b', 'a'\] in the test split but \['a', 'b'\]"):
        load(cache, dataset_name="someone/mismatched", train_val_split=None)


def test_split_too_small_to_stratify_and_bad_fraction(train_dir, cache):
    with pytest.raises(DataError, match="stratified.*--train_val_split"):
        load(cache, train_dir=train_dir, train_val_split=0.05)
    with pytest.raises(DataError, match=r"--train_val_split must be a fraction in \(0, 1\), got 1.5"):
        load(cache, train_dir=train_dir, train_val_split=1.5)


def test_corrupt_and_vanished_images_are_named(train_dir, cache):
    (train_dir / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    data = load(cache, train_dir=train_dir, train_val_split=None)
    train_transform, _ = build_transforms(mobilenet_processor())
    broken = data.train.filter(lambda row: row["image"]["path"].endswith("broken.png")).with_transform(
        train_transform
    )
    with pytest.raises(DataError, match=r"cannot read the image '.*cat/broken\.png' in column 'image'"):
        broken[0]
    (train_dir / "dog" / "03.png").unlink()
    vanished = data.train.filter(lambda row: row["image"]["path"].endswith("dog/03.png"))
    with pytest.raises(DataError, match=r"dog/03\.png"):
        vanished.with_transform(train_transform)[0]
    with pytest.raises(DataError, match="without an image"):
        decode_image(None)


# ------------------------------------------------------------------------------------------
# to_rgb
# ------------------------------------------------------------------------------------------


def rgb_pixel(image: Image.Image) -> tuple[int, int, int]:
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == image.size
    return converted.getpixel((0, 0))


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (Image.fromarray(np.full((2, 2), 100 * 257, np.uint16)), (100, 100, 100)),  # I;16, scaled not clipped
        (Image.new("I", (2, 2), 65535), (255, 255, 255)),
        (Image.new("I", (2, 2), 200), (200, 200, 200)),  # 8-bit data in a wide mode
        (Image.new("F", (2, 2), 0.5), (128, 128, 128)),  # floats in [0, 1]
        (Image.new("F", (2, 2), 300.0), (255, 255, 255)),  # other floats are clipped
        (Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("RGB", (2, 2), (10, 200, 30)).convert("YCbCr"), None),
        (Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
        (Image.new("LA", (2, 2), (40, 255)), (40, 40, 40)),
        (Image.new("RGBA", (2, 2), (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent -> white
        (Image.new("RGBA", (2, 2), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("RGBA", (2, 2), (0, 0, 0, 128)), (127, 127, 127)),  # half alpha blends with white
        (Image.new("RGB", (2, 2), (51, 102, 153)).convert("P"), (51, 102, 153)),  # a web-palette colour
    ],
    ids=[
        "L",
        "1",
        "I;16",
        "I-16bit",
        "I-8bit",
        "F-unit",
        "F-clip",
        "CMYK",
        "YCbCr",
        "LA-clear",
        "LA-opaque",
        "RGBA-clear",
        "RGBA-opaque",
        "RGBA-half",
        "P",
    ],
)
def test_to_rgb_modes(image, expected):
    pixel = rgb_pixel(image)
    if expected is None:  # YCbCr round trip is lossy by a unit or two
        assert np.abs(np.subtract(pixel, (10, 200, 30))).max() <= 2
    else:
        assert pixel == expected


def test_to_rgb_palette_transparency_and_identity():
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([200, 10, 10] * 256)
    palette.info["transparency"] = 0
    assert rgb_pixel(palette) == (255, 255, 255)
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(rgb) is rgb


# ------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------

PROCESSORS = {
    "mobilenet_v2": lambda: mobilenet_processor(),
    "convnext-crop_pct": lambda: transformers.ConvNextImageProcessorPil(size={"shortest_edge": 32}),
    "convnext-warp": lambda: transformers.ConvNextImageProcessorPil(size={"shortest_edge": 384}),
    "vit-warp": lambda: transformers.ViTImageProcessorPil(size={"height": 30, "width": 34}),
    "efficientnet-include_top": lambda: transformers.EfficientNetImageProcessorPil(
        size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}
    ),
    "efficientnet-lite0": lambda: transformers.EfficientNetImageProcessorPil(
        size={"shortest_edge": 48},
        crop_size={"height": 42, "width": 42},
        do_center_crop=True,
        include_top=False,
        resample=3,
    ),
    "poolformer": lambda: transformers.PoolFormerImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ),
    "bit": lambda: transformers.BitImageProcessorPil(
        size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}
    ),
}


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_eval_transform_matches_the_processor_at_native_size(name):
    processor = PROCESSORS[name]()
    image = make_image("RGB", 70, 45, seed=1)
    _, eval_transform = build_transforms(processor)
    ours = eval_transform({"image": [image], "label": [0]})["pixel_values"][0]
    reference = processor(images=image, return_tensors="np")["pixel_values"][0]
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-5)


def test_image_size_override_keeps_crop_fraction():
    """`image_size` is one rule, `resize_image_processor`'s: the processor saved with the model is the evaluation."""
    from hf_adafilter.data.transforms import resize_image_processor

    lite0 = transformers.EfficientNetImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        include_top=False,
    )
    image = make_image("RGB", 170, 120, seed=2)
    for processor, size, resized_size in (
        (lite0, 128, {"shortest_edge": 146}),  # round(128 / 0.875)
        (transformers.ConvNextImageProcessorPil(), 96, {"shortest_edge": 96}),  # with its crop_pct 0.875
        (transformers.ViTImageProcessorPil(), 64, {"height": 64, "width": 64}),  # a warp stays a warp
    ):
        train_transform, eval_transform = build_transforms(processor, image_size=size)
        resized = resize_image_processor(processor, size)
        assert train_transform.spec.crop_size == (size, size) and dict(resized.size) == resized_size
        ours = eval_transform({"image": [image], "label": [0]})["pixel_values"][0]
        np.testing.assert_allclose(ours.numpy(), resized(images=image, return_tensors="np")["pixel_values"][0])


def test_transform_outputs_and_normalisation(train_dir, cache):
    data = load(cache, train_dir=train_dir, train_val_split=None)
    train_transform, eval_transform = build_transforms(
        mobilenet_processor(), image_size=24, image_column=data.image_column, label_column=data.label_column
    )
    for transform in (train_transform, eval_transform):
        loader = torch.utils.data.DataLoader(
            data.train.with_transform(transform), batch_size=len(data.train), collate_fn=collate_fn
        )
        batch = next(iter(loader))  # every mode in the folder: RGB, RGBA, P, L, I;16
        assert batch["pixel_values"].shape == (30, 3, 24, 24) and batch["pixel_values"].dtype == torch.float32
        assert batch["labels"].dtype == torch.long
        assert sorted(batch["labels"].tolist()) == [0] * 10 + [1] * 10 + [2] * 10
        assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0  # mean = std = 0.5
    white, black = Image.new("RGB", (50, 40), "white"), Image.new("L", (50, 40), 0)
    out = train_transform({"image": [white, black], "label": [0, 1]})["pixel_values"]
    assert torch.allclose(out[0], torch.ones(3, 24, 24)) and torch.allclose(out[1], -torch.ones(3, 24, 24))


def test_transparent_png_is_composited_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(path)
    processor = mobilenet_processor(image_mean=[0, 0, 0], image_std=[1, 1, 1])
    _, eval_transform = build_transforms(processor)
    pixels = eval_transform({"image": [{"path": str(path), "bytes": None}], "label": [0]})["pixel_values"][0]
    assert torch.allclose(pixels, torch.ones(3, 32, 32))


def test_train_transform_follows_torch_rng():
    train_transform, _ = build_transforms(mobilenet_processor())
    batch = {"image": [make_image("RGB", 60, 40, seed=s) for s in range(4)], "label": [0, 1, 2, 0]}

    def run(seed):
        torch.manual_seed(seed)
        return torch.stack(train_transform(batch)["pixel_values"])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    clone = pickle.loads(pickle.dumps(train_transform))  # survives spawned DataLoader workers
    torch.manual_seed(0)
    assert torch.equal(torch.stack(clone(batch)["pixel_values"]), run(0))


def test_random_resized_crop_box_and_flip():
    torch.manual_seed(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(80, 50)
        assert 0 <= left and left + w <= 80 and 0 <= top and top + h <= 50
        assert 0.08 * 4000 * 0.9 <= w * h and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    assert random_resized_crop_box(1000, 10) == (493, 0, 13, 10)  # no valid draw: clamped central crop
    # Left half black, right half white; a crop sees both halves when it straddles the middle.
    halves = Image.fromarray(np.repeat(np.repeat([[0, 255]], 40, axis=0).astype(np.uint8), 40, axis=1))
    train_transform, _ = build_transforms(mobilenet_processor())
    torch.manual_seed(1)
    outputs = train_transform({"image": [halves] * 200, "label": [0] * 200})["pixel_values"]
    left_minus_right = [float(x[:, :, :16].mean() - x[:, :, 16:].mean()) for x in outputs]
    assert sum(d > 0.5 for d in left_minus_right) > 20 and sum(d < -0.5 for d in left_minus_right) > 20


def test_augmentation_can_keep_orientation_and_most_of_the_image():
    halves = Image.fromarray(np.repeat(np.repeat([[0, 255]], 40, axis=0).astype(np.uint8), 40, axis=1))
    no_flip = Augmentation(min_crop_scale=0.5, horizontal_flip=False)
    train_transform, _ = build_transforms(mobilenet_processor(), augmentation=no_flip)
    torch.manual_seed(1)
    outputs = train_transform({"image": [halves] * 100, "label": [0] * 100})["pixel_values"]
    # Never mirrored: the dark half stays left whenever the crop shows both halves.
    assert all(float(x[:, :, :16].mean() - x[:, :, 16:].mean()) <= 0.05 for x in outputs)
    with pytest.raises(ValueError, match="min_crop_scale"):
        Augmentation(min_crop_scale=0.0)


def test_collate_fn():
    examples = [
        {"pixel_values": torch.zeros(3, 4, 4), "labels": 1},
        {"pixel_values": np.ones((3, 4, 4)), "labels": 0},
    ]
    batch = collate_fn(examples)
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


@pytest.mark.parametrize(
    "processor",
    [
        transformers.ConvNextImageProcessorPil(),
        transformers.ViTImageProcessorPil(),
        transformers.BitImageProcessorPil(),
        transformers.MobileNetV2ImageProcessorPil(),
        transformers.EfficientNetImageProcessorPil(size={"height": 256, "width": 256}, crop_size=224),
    ],
    ids=lambda p: type(p).__name__,
)
def test_resized_processor_preprocesses_exactly_like_the_eval_transform(processor):
    """run.py saves the resized processor: whoever loads the model must see what evaluation saw."""
    from hf_adafilter.data.transforms import resize_image_processor

    resized = resize_image_processor(processor, 96)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 210, 3)).astype("uint8"))
    _, eval_transform = build_transforms(resized)
    ours = eval_transform({"image": [image], "label": [0]})["pixel_values"][0]
    theirs = torch.as_tensor(resized(image, return_tensors="pt")["pixel_values"][0])
    assert ours.shape == theirs.shape == (3, 96, 96)
    assert (ours - theirs).abs().max() < 1e-5
    assert processor.size != resized.size, "the original processor is left untouched"


def test_a_hub_style_dataset_gets_the_class_checks_of_image_folders(tmp_path, cache):
    """One class in train, or a class only in validation: refused, as for image folders."""
    features = {"image": IMAGE_FEATURE, "label": {"_type": "ClassLabel", "names": ["ant", "bee", "cow"]}}
    images = [png_bytes(seed) for seed in range(4)]
    one_class = write_parquet_dataset(
        tmp_path / "one", {"train": {"image": images, "label": [0, 0, 0, 0]}}, features
    )
    with pytest.raises(DataError, match=r"the train split of .*one holds 1 class \(\['ant'\]\)"):
        load(cache, dataset_name=str(one_class), train_val_split=None)
    only_in_validation = write_parquet_dataset(
        tmp_path / "extra",
        {
            "train": {"image": images, "label": [0, 1, 0, 1]},
            "validation": {"image": images[:2], "label": [2, 0]},
        },
        features,
    )
    with pytest.raises(
        DataError, match=r"class 'cow' appears in the validation split of .*extra but has no images"
    ):
        load(cache, dataset_name=str(only_in_validation))
