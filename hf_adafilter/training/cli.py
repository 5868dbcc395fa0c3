"""Fine-tune an image classifier with AdaFilter (or a baseline) through the transformers Trainer: the code of
`examples/run.py` and of the `hf-adafilter-train` console script.

    accelerate launch examples/run.py --model_name_or_path efficientnet-lite0 \\
        --train_dir data/train --validation_dir data/val --method adafilter \\
        --output_dir out --do_train --do_eval --num_train_epochs 3
    hf-adafilter-train --model_name_or_path ...    # the same, where the package is installed

With no arguments it runs the embedded default: the packaged ImageNet EfficientNet-Lite0 fine-tuned with
AdaFilter on the Fashion-MNIST subset shipped in examples/data (a few minutes on 2 CPU cores).
The result loads with `AutoModelForImageClassification.from_pretrained(output_dir)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
import psutil
import torch
import transformers
from transformers import TrainingArguments, set_seed

from ..data.images import check_images
from ..data.loading import DataError, load_default_dataset, load_image_classification_data
from ..data.transforms import Augmentation, build_transforms, collate_fn, resize_image_processor
from ..hub.model_card import PREDICTIONS_FILE
from ..metrics import build_compute_metrics
from .arguments import AdaFilterArguments, BaselineArguments, DataTrainingArguments, ModelArguments
from .command_line import DEFAULT_ARGS, parse_args, parse_args_and_defaults  # noqa: F401  (the script's API)
from .methods import (
    build_classifier,
    build_weight_penalty,
    count_parameters,
    load_image_processor,
)
from .resume import check_checkpoint_labels, check_output_dir, detect_checkpoint
from .run_lock import output_dir_lock

logger = logging.getLogger(__name__)

def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int):
    options = dict(
        train_val_split=data_args.train_val_split,
        seed=seed,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        max_predict_samples=data_args.max_predict_samples,
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


def accelerate_default_cpu_threads(launcher: psutil.Process | None = None) -> int | None:
    """The torch threads to use instead of the one `accelerate launch` leaves on CPU, or None to keep it.

    Without `--num_cpu_threads_per_process` and without OMP_NUM_THREADS in the launching shell, accelerate exports
    OMP_NUM_THREADS=1 (its CPU heuristic applies only with --cpu), so a CPU job uses one core. Then: the cores this
    process may use, divided by the local processes. None when not launched so, on a GPU, or when the user chose a
    thread count (the flag or the variable)."""
    if os.environ.get("OMP_NUM_THREADS") != "1" or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return None
    if torch.cuda.is_available():
        return None
    launcher = launcher or _accelerate_launcher()
    try:
        if launcher is None or "OMP_NUM_THREADS" in launcher.environ():
            return None
        if any(arg.startswith("--num_cpu_threads_per_process") for arg in launcher.cmdline()):
            return None
    except psutil.Error:  # another user's process, or gone: leave the setting alone
        return None
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, len(os.sched_getaffinity(0)) // local_processes)


def _accelerate_launcher() -> psutil.Process | None:
    """The `accelerate launch` process above this one (directly, or above torchrun's agent)."""
    try:
        for process in psutil.Process().parents():
            command = process.cmdline()
            head = command[:4]  # `accelerate launch ...` or `python -m accelerate.commands.launch ...`
            if any(part.endswith("accelerate.commands.launch") for part in head) or (
                "launch" in head and any(part.endswith("accelerate") for part in head)
            ):
                return process
    except psutil.Error:
        return None
    return None


def main(argv: list[str] | None = None) -> dict[str, float]:
    parsed, applied = parse_args_and_defaults(argv)
    model_args, data_args, adafilter_args, baseline_args, training_args = parsed
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    if applied:
        logger.info(f"{model_args.method} defaults for flags not given: {applied}")
    threads = accelerate_default_cpu_threads()
    if threads is not None and threads > 1:
        torch.set_num_threads(threads)
        logger.info(
            f"CPU threads: {threads} (accelerate launch set 1; pass --num_cpu_threads_per_process to choose)"
        )
    transformers.utils.logging.set_verbosity(logging.WARNING)
    # with_transform builds pixel_values on the fly: the Trainer must not drop the raw columns it reads them from.
    training_args.remove_unused_columns = False
    check_output_dir(training_args.output_dir)
    # One run per output folder: the main process holds its lock until the run has written everything.
    lock = output_dir_lock(training_args.output_dir) if training_args.process_index == 0 else contextlib.nullcontext()
    with lock:
        return train_and_evaluate(model_args, data_args, adafilter_args, baseline_args, training_args)


def train_and_evaluate(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    adafilter_args: AdaFilterArguments,
    baseline_args: BaselineArguments,
    training_args: TrainingArguments,
) -> dict[str, float]:
    """The run itself, from the rerun policy to the last saved file."""
    if adafilter_args.save_compact and model_args.method != "adafilter":
        raise DataError(
            f"--save_compact saves AdaFilter's compact format; --method {model_args.method} saves a plain model: "
            "drop the flag."
        )
    last_checkpoint = detect_checkpoint(training_args, model_args)
    set_seed(training_args.seed)

    data = load_data(data_args, model_args, training_args.seed)
    if training_args.do_predict and data.test is None:
        raise DataError(
            "--do_predict needs a test split: pass --test_dir, or a dataset with a 'test' split (or drop --do_predict)."
        )
    check_checkpoint_labels(training_args.resume_from_checkpoint or last_checkpoint, data.id2label)
    used = {
        "train": training_args.do_train,
        "validation": training_args.do_eval,
        "test": training_args.do_predict,
    }
    if not data_args.skip_image_check:
        check_images(data, [split for split, needed in used.items() if needed])
    hub_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
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
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
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

    from .trainer import AdaFilterTrainer

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
        if adafilter_args.evaluate_static_export:
            metrics |= trainer.evaluate_static_export(eval_dataset, calibration_images(data, eval_transform), "eval")
        if data_args.evaluate_train_split:
            train_images = data.require("train").with_transform(eval_transform)
            metrics |= trainer.predict(train_images, metric_key_prefix="train_eval").metrics
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
        trainer.save_gate_analysis()
    if training_args.do_predict:
        test_dataset = data.test.with_transform(eval_transform)
        prediction = trainer.predict(test_dataset, metric_key_prefix="test")
        metrics = prediction.metrics
        if trainer.is_world_process_zero():
            save_predictions(prediction, data.id2label, training_args.output_dir)
        if adafilter_args.evaluate_forced_gates:
            metrics |= trainer.evaluate_forced_gates(test_dataset, metric_key_prefix="test")
        if adafilter_args.evaluate_static_export:
            metrics |= trainer.evaluate_static_export(test_dataset, calibration_images(data, eval_transform), "test")
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
        results.update(metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(**model_card_kwargs(model_args, data_args))
    elif training_args.do_train and trainer.is_world_process_zero():
        trainer.create_model_card(**model_card_kwargs(model_args, data_args))  # README.md, as HF's scripts do
    if trainer.is_world_process_zero() and "eval_accuracy" in results:
        print(
            f"\n{model_args.method} on {data_args.dataset_name or data_args.train_dir or 'fashion-mnist-small'}: "
            f"eval accuracy {results['eval_accuracy']:.4f} (chance {1 / len(data.labels):.4f})"
        )
    shut_down_distributed(trainer)
    return results


def calibration_images(data, eval_transform, images: int = 256):
    """The static export's calibration images: the first `images` of train, as evaluation sees them."""
    train = data.require("train")
    return train.select(range(min(images, len(train)))).with_transform(eval_transform)


def save_predictions(prediction, id2label: dict[int, str], output_dir: str) -> None:
    """`predict_results.txt` (as transformers' example scripts write it): index, label and predicted label of
    every test image, in the test split's order; a paired comparison of two models reads it image by image."""
    predicted = np.asarray(prediction.predictions).argmax(-1)
    lines = ["index\tlabel\tprediction"] + [
        f"{index}\t{id2label[int(label)]}\t{id2label[int(guess)]}"
        for index, (label, guess) in enumerate(zip(prediction.label_ids, predicted, strict=True))
    ]
    (Path(output_dir) / PREDICTIONS_FILE).write_text("\n".join(lines) + "\n")


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
    """Two-process CPU DDP (gloo) can hang or crash a rank at exit unless both ranks leave together."""
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


def run() -> None:
    """The command-line entry: a data or argument problem ends with its message, not a traceback."""
    try:
        main()
    except DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    run()
