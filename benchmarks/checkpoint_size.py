"""Checkpoint size of AdaFilter models: full (`model.safetensors`) vs compact (`model.compact.safetensors`).

A full checkpoint stores the frozen pre-trained bank although it is a copy of the base backbone; a compact one stores
only what training changed (fine-tuned bank, norms, gate network, head) and rebuilds the bank from the base at load
time. This saves both formats of two models and reports the weight-file sizes, their ratio, and what the compact
file is made of:

- EfficientNet-Lite0 with its packaged ImageNet weights (alias "efficientnet-lite0");
- a ResNet-50-shaped model (transformers' default `ResNetConfig`, the paper's backbone) with random weights: sizes
  depend on shapes only;

each with the default gate network and with the lean one (16 wide). The last column is the ratio a compact
checkpoint would have without any gate network: the floor that shrinking the gate network approaches.

    python benchmarks/checkpoint_size.py                 # writes benchmarks/results/checkpoint_size.md
    python benchmarks/checkpoint_size.py --num_labels 1000
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hf_adafilter import AdaFilterForImageClassification  # noqa: E402
from hf_adafilter.hub.model_card import weight_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "checkpoint_size.md"
PARTS = ("fine-tuned bank", "norms", "gate network", "head", "other")


def component(key: str) -> str:
    """Which part of the model a compact tensor belongs to."""
    if key.startswith("classifier."):
        return "head"
    if ".gate_controller." in f".{key}":
        return "gate network"
    if ".finetuned_layer." in key:
        return "fine-tuned bank"
    if any(part in key for part in ("norm", "batchnorm", "_bn", "running_", "num_batches_tracked")):
        return "norms"
    return "other"


# Gate-network settings measured: the default, and the lean network (same accuracy on the short transfer preset).
GATES = {"": {}, ", lean gates (16 wide)": {"gate_input_size": 16, "gate_hidden_size": 16}}


def build(name: str, workdir: Path, num_labels: int, gates: dict) -> AdaFilterForImageClassification:
    if name == "efficientnet-lite0":
        return AdaFilterForImageClassification.from_backbone(
            "efficientnet-lite0", num_labels=num_labels, **gates
        )
    torch.manual_seed(0)
    backbone = transformers.ResNetModel(transformers.ResNetConfig())  # ResNet-50: [3, 4, 6, 3] bottlenecks
    backbone.save_pretrained(workdir / "resnet50-backbone")
    return AdaFilterForImageClassification.from_backbone(
        str(workdir / "resnet50-backbone"), num_labels=num_labels, **gates
    )


def measure(name: str, num_labels: int, gates: dict, label: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = build(name, workdir, num_labels, gates).eval()
        model.save_pretrained(workdir / "full")
        model.save_pretrained(workdir / "compact", compact=True)
        start = time.perf_counter()
        loaded = AdaFilterForImageClassification.from_pretrained(workdir / "compact")
        compact_load_s = time.perf_counter() - start
        start = time.perf_counter()
        AdaFilterForImageClassification.from_pretrained(workdir / "full")
        full_load_s = time.perf_counter() - start
        before, after = model.state_dict(), loaded.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        full, compact = weight_bytes(workdir / "full"), weight_bytes(workdir / "compact")
    frozen = model.frozen_parameter_names()
    parts: dict[str, int] = defaultdict(int)
    for key, tensor in model.state_dict().items():
        if key not in frozen:
            parts[component(key)] += tensor.numel() * tensor.element_size()
    gate_bytes = parts["gate network"]
    return {
        "name": label,
        "full": full,
        "compact": compact,
        "ratio": compact / full,
        "floor": (compact - gate_bytes) / (full - gate_bytes),
        "parts": dict(parts),
        "gated_layers": len(model.gated_layer_names),
        "full_load_s": full_load_s,
        "compact_load_s": compact_load_s,
    }


def megabytes(size: float) -> str:
    return f"{size / 1e6:.2f} MB"


def report(rows: list[dict], num_labels: int) -> str:
    lines = [
        "# Checkpoint size: full vs compact",
        "",
        f"`python benchmarks/checkpoint_size.py --num_labels {num_labels}` on "
        f"{datetime.date.today().isoformat()} (torch {torch.__version__}, transformers {transformers.__version__}). "
        f"fp32 weights, a {num_labels}-class head. Sizes are the safetensors weight files only "
        "(config and remote code add about 100 kB to both).",
        "",
        "| model | gated layers | full | compact | compact / full | without a gate network |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['gated_layers']} | {megabytes(row['full'])} | {megabytes(row['compact'])} | "
            f"{row['ratio']:.3f} | {row['floor']:.3f} |"
        )
    lines += ["", "What the compact file holds (tensor bytes):", ""]
    lines += ["| model | " + " | ".join(PARTS) + " |", "|" + " --- |" * (len(PARTS) + 1)]
    for row in rows:
        cells = [megabytes(row["parts"].get(part, 0)) for part in PARTS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Loading time (one run, CPU, includes reading the files): the compact load also loads the base backbone "
        "and hashes its frozen tensors.",
        "",
        "| model | full load | compact load |",
        "| --- | --- | --- |",
    ]
    for row in rows:
        lines.append(f"| {row['name']} | {row['full_load_s']:.2f} s | {row['compact_load_s']:.2f} s |")
    lines += [
        "",
        "The compact file drops the frozen pre-trained bank and the ungated frozen convolutions (stem, "
        "squeeze-excite); what remains is the fine-tuned bank (one copy of the gated filters), the gate network "
        "(per layer an input projection and a head with one log-odds per filter), the norms and the head. A full "
        "checkpoint holds both banks, so compact / full cannot go below about one half however small the gate "
        "network (last column of the first table) without storing the fine-tuned bank in fewer bits.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_labels", type=int, default=10)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = [
        measure(name, args.num_labels, gates, name + suffix)
        for name in ("efficientnet-lite0", "resnet-50 (random)")
        for suffix, gates in GATES.items()
    ]
    text = report(rows, args.num_labels)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
