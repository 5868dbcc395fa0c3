"""The command-line arguments of AdaFilter and of the baselines, in the dataclass style `HfArgumentParser` reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..baselines.l2sp import L2SP_ALPHA, L2SP_BETA
from ..baselines.lora import LORA_ALPHA, LORA_DROPOUT, LORA_R
from ..data.transforms import Augmentation
from ..modeling.configuration_adafilter import GATE_NETWORKS, AdaFilterConfig
from .regularization import GATE_REGULARIZERS

# The training methods of the pipeline (`methods.build_classifier` builds each).
METHODS = ("adafilter", "finetune", "linear_probe", "l2sp", "lora", "bitfit")


@dataclass
class AdaFilterArguments:
    """How the gated model is built and how its gates are trained."""

    gate_network: str = field(
        default=AdaFilterConfig.gate_network,
        metadata={
            "help": "Gate network: lstm (the paper's), gru, or independent (no-RNN ablation).",
            "choices": list(GATE_NETWORKS),
        },
    )
    gate_input_size: int = field(
        default=AdaFilterConfig.gate_input_size,
        metadata={"help": "Projection size of each layer's pooled input."},
    )
    gate_hidden_size: int = field(
        default=AdaFilterConfig.gate_hidden_size,
        metadata={"help": "Hidden size of the shared recurrent cell."},
    )
    gated_norm: bool = field(
        default=AdaFilterConfig.gated_norm,
        metadata={"help": "Separate BatchNorms for the two banks (False: the no-gated-BN ablation)."},
    )
    target_modules: str | None = field(
        default=None, metadata={"help": "Regex of the layers to gate (default: every conv but stem and SE)."}
    )
    exclude_modules: str | None = field(default=None, metadata={"help": "Regex of layers never to gate."})
    gate_regularization: str = field(
        default="none",
        metadata={
            "help": "Gate regulariser: none, l1 (fine-tune few filters) or budget (aim at gate_target_ratio).",
            "choices": list(GATE_REGULARIZERS),
        },
    )
    gate_regularization_weight: float = field(
        default=0.0, metadata={"help": "Weight of the gate regulariser."}
    )
    gate_target_ratio: float = field(
        default=0.5, metadata={"help": "Target share of fine-tuned filters for the budget regulariser."}
    )
    gumbel_temperature_start: float = field(
        default=5.0, metadata={"help": "Gumbel-softmax temperature at step 0."}
    )
    gumbel_temperature_end: float = field(
        default=0.5, metadata={"help": "Temperature at the last step (geometric annealing in between)."}
    )
    gate_init_log_odds: float = field(
        default=AdaFilterConfig.gate_init_log_odds,
        metadata={
            "help": "Initial prior log-odds of every filter using the fine-tuned bank (gate head bias)."
        },
    )
    gate_noise_start: float = field(
        default=1.0,
        metadata={"help": "Scale of the Gumbel (logistic) noise of training decisions at step 0."},
    )
    gate_noise_end: float = field(
        default=0.0,
        metadata={
            "help": "Noise scale at the last step (linear in between); 0 makes the last training decisions the "
            "evaluation decisions."
        },
    )
    gate_warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Share of the training steps that fine-tune first (every gate on the fine-tuned bank, the gate "
            "network idle) before the gates learn; with a high --gate_init_log_odds and a gate regulariser, the "
            "gates then move filters back to the pre-trained bank where that does not cost training loss."
        },
    )
    gate_learning_rate: float | None = field(
        default=1e-2,
        metadata={
            "help": "Learning rate of the gate network (None: --learning_rate). With Adam a parameter moves about "
            "one learning rate per step, so at a CNN's 1e-3 the log-odds barely leave their start in a short run."
        },
    )
    batchnorm_momentum: float | None = field(
        default=0.1,
        metadata={
            "help": "BatchNorm momentum while training, PyTorch meaning (weight of the new batch), for every "
            "method (None: the backbone's). Backbones converted from TF carry 0.01 (TF's 0.99, made for "
            "ImageNet-length runs): after a few hundred fine-tuning steps their evaluation statistics are still "
            "largely ImageNet's."
        },
    )

    save_compact: bool = field(
        default=False,
        metadata={
            "help": "Save the final model (and push it, with --push_to_hub) as a compact checkpoint: only what "
            "training changed plus a checksummed reference to the backbone, which from_pretrained rebuilds the "
            "frozen bank from. Trainer checkpoints stay full, so resuming is unchanged."
        },
    )
    evaluate_forced_gates: bool = field(
        default=False,
        metadata={
            "help": "Also evaluate with every gate forced to the fine-tuned and to the pre-trained bank "
            "(two extra passes per evaluated split): the learned gates should beat both."
        },
    )
    evaluate_static_export: bool = field(
        default=False,
        metadata={
            "help": "Also evaluate the model's static export (`export_static`, calibrated on up to "
            "256 training images with the evaluation transform): what serving without gates costs in accuracy "
            "(`{split}_static_accuracy`, `static_agreement`)."
        },
    )

    def __post_init__(self) -> None:
        if self.gate_regularization not in GATE_REGULARIZERS:
            raise ValueError(
                f"--gate_regularization must be one of {', '.join(GATE_REGULARIZERS)}, got {self.gate_regularization!r}."
            )
        if self.gate_regularization_weight < 0:
            raise ValueError(
                f"--gate_regularization_weight must be >= 0, got {self.gate_regularization_weight}."
            )
        if not 0.0 <= self.gate_target_ratio <= 1.0:
            raise ValueError(f"--gate_target_ratio must be in [0, 1], got {self.gate_target_ratio}.")
        for name in ("gumbel_temperature_start", "gumbel_temperature_end"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}.")
        for name in ("gate_noise_start", "gate_noise_end"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if not 0.0 <= self.gate_warmup_ratio < 1.0:
            raise ValueError(f"--gate_warmup_ratio must be in [0, 1), got {self.gate_warmup_ratio}.")
        if self.gate_learning_rate is not None and not self.gate_learning_rate > 0:
            raise ValueError(f"--gate_learning_rate must be > 0, got {self.gate_learning_rate}.")
        if self.batchnorm_momentum is not None and not 0.0 < self.batchnorm_momentum <= 1.0:
            raise ValueError(f"--batchnorm_momentum must be in (0, 1], got {self.batchnorm_momentum}.")

    def model_overrides(self) -> dict:
        """The fields that go into `AdaFilterConfig`: those of the same name, and the starting temperature."""
        config_fields = {f.name for f in fields(AdaFilterConfig)}
        overrides = {key: value for key, value in asdict(self).items() if key in config_fields}
        overrides["gumbel_temperature"] = self.gumbel_temperature_start
        return overrides


@dataclass
class BaselineArguments:
    """Settings of the baselines that train through the same pipeline (`--method l2sp | lora`)."""

    l2sp_alpha: float = field(
        default=L2SP_ALPHA,
        metadata={
            "help": "L2-SP: weight of alpha/2 * ||w - w0||^2 pulling the backbone towards its pretrained w0."
        },
    )
    l2sp_beta: float = field(
        default=L2SP_BETA, metadata={"help": "L2-SP: weight of beta/2 * ||w||^2 on the new head."}
    )
    lora_r: int = field(default=LORA_R, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(
        default=LORA_ALPHA, metadata={"help": "LoRA scaling numerator (scale alpha / r)."}
    )
    lora_dropout: float = field(default=LORA_DROPOUT, metadata={"help": "Dropout on LoRA's input."})

    def __post_init__(self) -> None:
        for name in ("l2sp_alpha", "l2sp_beta"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}.")
        if not self.lora_alpha > 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")


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
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow the backbone's own modelling code from the Hub to run (read it first)."},
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={
            "help": "Give the model a new head when the data's labels differ from the checkpoint's (a new task "
            "always needs one, hence on by default; false: refuse instead)."
        },
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
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate validation (debugging); the test split is left whole."}
    )
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate test (debugging)."})
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
    skip_image_check: bool = field(
        default=False,
        metadata={
            "help": "Skip decoding every image of the splits the run uses before training (for a large dataset you "
            "vouch for): an unreadable image then stops the run when it is reached."
        },
    )
    evaluate_train_split: bool = field(
        default=False,
        metadata={
            "help": "With --do_eval, also evaluate the training images (evaluation transform): train_eval_accuracy "
            "next to eval_accuracy shows under- or overfitting."
        },
    )
