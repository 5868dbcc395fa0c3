#!/usr/bin/env python
"""Fine-tune an image classifier with AdaFilter (or a baseline) through the transformers Trainer.

    accelerate launch examples/run.py --model_name_or_path efficientnet-lite0 \\
        --train_dir data/train --validation_dir data/val --method adafilter \\
        --output_dir out --do_train --do_eval --num_train_epochs 3

With no arguments it runs the embedded default: the packaged ImageNet EfficientNet-Lite0 fine-tuned with
AdaFilter on the Fashion-MNIST subset shipped in examples/data (a few minutes on 2 CPU cores).
The result loads with `AutoModelForImageClassification.from_pretrained(output_dir)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from hf_adafilter.arguments import AdaFilterArguments, BaselineArguments
from hf_adafilter.data import (
    Augmentation,
    DataError,
    build_transforms,
    collate_fn,
    load_default_dataset,
    load_image_classification_data,
    resize_image_processor,
)
from hf_adafilter.methods import (
    METHODS,
    TRAINING_DEFAULTS,
    apply_training_defaults,
    build_classifier,
    build_weight_penalty,
    count_parameters,
    load_image_processor,
)
from hf_adafilter.metrics import build_compute_metrics
from hf_adafilter.plots import plot_gate_fractions

logger = logging.getLogger(__name__)

# The embedded default job: what `python examples/run.py` runs with no arguments.
DEFAULT_ARGS = [
    "--output_dir", "outputs/fashion-mnist-adafilter",
    "--overwrite_output_dir",
    "--do_train", "--do_eval",
    "--num_train_epochs", "3",
    "--image_size", "128",
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "64",
    "--learning_rate", "1e-3",
    "--weight_decay", "0.01",
    "--warmup_steps", "10",
    "--eval_strategy", "epoch",
    "--save_strategy", "epoch",
    "--save_total_limit", "1",
    "--logging_steps", "10",
    "--report_to", "none",
    "--seed", "42",
]  # fmt: skip


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="efficientnet-lite0",
        metadata={
            "help": "Pretrained backbone: a Hub id, a local path, a packaged alias (efficientnet-lite0), or an "
            "AdaFilter checkpoint to keep training."
        },
    )
    method: str = field(
        default="adafilter",
        metadata={
            "help": "adafilter, or a baseline through the same pipeline: finetune, linear_probe, l2sp (fine-tuning "
            "pulled towards the pretrained weights), lora (PEFT LoRA on the layers AdaFilter gates; needs peft), "
            "bitfit (biases, norms and head only).",
            "choices": list(METHODS),
        },
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor to use (default: the backbone's)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the backbone."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a model already saved in --output_dir."}
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub image-classification dataset."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder (one sub-folder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation."})
    test_dir: str | None = field(
        default=None, metadata={"help": "Image folder for the final test (--do_predict)."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column (default: detected)."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Label column (default: detected)."}
    )
    train_val_split: float = field(
        default=0.15,
        metadata={"help": "Share of train carved out (stratified) when there is no validation split."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate train (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate evaluation (debugging)."})
    image_size: int | None = field(
        default=None, metadata={"help": "Training/eval crop size (default: the image processor's)."}
    )
    min_crop_scale: float = field(
        default=Augmentation.min_crop_scale,
        metadata={"help": "Smallest share of the image area a training crop keeps (random resized crop)."},
    )
    horizontal_flip: bool = field(
        default=Augmentation.horizontal_flip,
        metadata={
            "help": "Random horizontal flips in training (turn off for digits, text, left/right classes)."
        },
    )
    evaluate_train_split: bool = field(
        default=False,
        metadata={
            "help": "With --do_eval, also evaluate the training images (evaluation transform): train_eval_accuracy "
            "next to eval_accuracy shows under- or overfitting."
        },
    )


def training_defaults_help() -> str:
    per_method = "; ".join(
        f"{method}: " + ", ".join(f"--{name} {value:g}" for name, value in defaults.items())
        for method, defaults in TRAINING_DEFAULTS.items()
    )
    return (
        "Training defaults per --method, for small labelled datasets, used where the flag is not given (they replace "
        f"transformers' lr 5e-5 / 3 epochs / batch 8, made for transformers, not CNNs): {per_method}."
    )


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, AdaFilterArguments, BaselineArguments, TrainingArguments),
        epilog=training_defaults_help(),
    )
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("No arguments: running the embedded default job:\n  examples/run.py " + " ".join(DEFAULT_ARGS))
        argv = DEFAULT_ARGS
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        given = set(json.loads(Path(argv[0]).read_text()))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
        given = {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}
    model_args, *_, training_args = parsed
    applied = apply_training_defaults(training_args, model_args.method, given)
    if applied:
        logger.info(f"{model_args.method} defaults for flags not given: {applied}")
    return parsed


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int):
    options = dict(
        train_val_split=data_args.train_val_split,
        seed=seed,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
    )
    if data_args.dataset_name is None and data_args.train_dir is None and data_args.validation_dir is None:
        logger.info("No dataset given: using the embedded Fashion-MNIST subset.")
        return load_default_dataset(**options)
    return load_image_classification_data(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        validation_dir=data_args.validation_dir,
        test_dir=data_args.test_dir,
        image_column_name=data_args.image_column_name,
        label_column_name=data_args.label_column_name,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
        **options,
    )


def detect_checkpoint(training_args: TrainingArguments, model_args: ModelArguments) -> str | None:
    """Resume from the last checkpoint in output_dir (as HF examples do); refuse to overwrite a saved model."""
    output_dir = Path(training_args.output_dir)
    if not training_args.do_train or not output_dir.is_dir():
        return None
    last_checkpoint = get_last_checkpoint(str(output_dir))
    if model_args.overwrite_output_dir:
        return None
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info(f"Checkpoint detected, resuming training at {last_checkpoint}.")
        return last_checkpoint
    saved = [p.name for p in output_dir.iterdir() if not p.name.startswith("checkpoint-")]
    if last_checkpoint is None and saved:
        raise DataError(
            f"--output_dir {output_dir} already holds {sorted(saved)[:4]}; pass --overwrite_output_dir to replace "
            "them, or choose another --output_dir."
        )
    return None


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, adafilter_args, baseline_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity(logging.WARNING)
    # with_transform builds pixel_values on the fly: the Trainer must not drop the raw columns (DESIGN.md 4).
    training_args.remove_unused_columns = False
    last_checkpoint = detect_checkpoint(training_args, model_args)
    set_seed(training_args.seed)

    data = load_data(data_args, model_args, training_args.seed)
    hub_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
    }
    processor = load_image_processor(
        model_args.image_processor_name or model_args.model_name_or_path, **hub_kwargs
    )
    if data_args.image_size is not None:
        # The saved processor then preprocesses exactly as the evaluation did.
        processor = resize_image_processor(processor, data_args.image_size)
    model = build_classifier(
        model_args.method,
        model_args.model_name_or_path,
        data.id2label,
        adafilter_args,
        baseline_args,
        **hub_kwargs,
    )
    trainable, total = count_parameters(model)
    logger.info(
        f"{model_args.method}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})"
    )
    augmentation = Augmentation(data_args.min_crop_scale, data_args.horizontal_flip)
    train_transform, eval_transform = build_transforms(
        processor, image_column=data.image_column, label_column=data.label_column, augmentation=augmentation
    )
    train_dataset = data.require("train").with_transform(train_transform) if training_args.do_train else None
    eval_dataset = data.validation.with_transform(eval_transform) if data.validation is not None else None

    from hf_adafilter.trainer import AdaFilterTrainer

    trainer = AdaFilterTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_fn,
        compute_metrics=build_compute_metrics(),
        processing_class=processor,
        adafilter_args=adafilter_args,
        weight_penalty=build_weight_penalty(model_args.method, model, baseline_args),
    )
    results: dict[str, float] = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)
    if training_args.do_eval:
        if eval_dataset is None:
            raise DataError("--do_eval needs validation data: pass --validation_dir or a dataset with one.")
        metrics = trainer.evaluate()
        if adafilter_args.evaluate_forced_gates:
            metrics |= trainer.evaluate_forced_gates(eval_dataset, metric_key_prefix="eval")
        if data_args.evaluate_train_split:
            train_images = data.require("train").with_transform(eval_transform)
            metrics |= trainer.predict(train_images, metric_key_prefix="train_eval").metrics
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
        save_gate_analysis(trainer, training_args.output_dir)
    if training_args.do_predict and data.test is not None:
        test_dataset = data.test.with_transform(eval_transform)
        metrics = trainer.predict(test_dataset, metric_key_prefix="test").metrics
        if adafilter_args.evaluate_forced_gates:
            metrics |= trainer.evaluate_forced_gates(test_dataset, metric_key_prefix="test")
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
        results.update(metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(**model_card_kwargs(model_args, data_args))
    if trainer.is_world_process_zero() and "eval_accuracy" in results:
        print(
            f"\n{model_args.method} on {data_args.dataset_name or data_args.train_dir or 'fashion-mnist-small'}: "
            f"eval accuracy {results['eval_accuracy']:.4f} (chance {1 / len(data.labels):.4f})"
        )
    shut_down_distributed(trainer)
    return results


def save_gate_analysis(trainer, output_dir: str) -> None:
    """The paper's per-layer analysis: the share of fine-tuned filters per gated layer on the validation set."""
    fractions = trainer.last_eval_gate_fractions
    if not fractions or not trainer.is_world_process_zero():
        return
    stages = getattr(trainer.model, "gated_layer_stages", None)
    (Path(output_dir) / "gate_fractions.json").write_text(json.dumps(fractions, indent=2) + "\n")
    plot_gate_fractions(fractions, Path(output_dir) / "finetuned_fraction_per_layer.png", stages=stages)


def model_card_kwargs(model_args: ModelArguments, data_args: DataTrainingArguments) -> dict:
    """What the model card needs beyond the Trainer's own state: the data and the training crop."""
    kwargs = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "tags": ["image-classification", model_args.method],
        "image_size": data_args.image_size,
    }
    if data_args.dataset_name:
        kwargs["dataset_tags"] = kwargs["dataset"] = data_args.dataset_name
    elif data_args.train_dir:
        train_dir = Path(data_args.train_dir).resolve()
        folder = train_dir.parent if train_dir.name in ("train", "training") else train_dir
        kwargs["dataset"] = folder.name
    else:
        kwargs["dataset"] = "fashion-mnist-small"
    return kwargs


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the parameters. BatchNorm running statistics are left out: under DDP each rank updates its own
    from its own batches between buffer broadcasts, and rank 0's are the ones saved."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shut_down_distributed(trainer) -> None:
    """Two-process CPU DDP can hang or crash a rank at exit unless both ranks leave together (DESIGN.md 4)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    # Every rank states what it ended with, so a diverged replica is visible in the logs.
    print(
        f"rank {torch.distributed.get_rank()}/{torch.distributed.get_world_size()} "
        f"final weights sha256 {weights_digest(trainer.model)}",
        flush=True,
    )
    torch.distributed.barrier()
    trainer.model = trainer.model_wrapped = None
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        sys.exit(f"error: {error}")
