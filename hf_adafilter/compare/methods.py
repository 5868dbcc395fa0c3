"""The methods a comparison can run: each one a set of training-script flags, its title, and its learning-rate grid.

Every method runs through the same training script (`hf_adafilter.training.cli`, i.e. `examples/run.py`) with the
same data, augmentation, steps, batch and image size; only these flags and the learning rate differ.
"""

from __future__ import annotations

# Stands for the run's learning rate in a method's flags.
LEARNING_RATE = "{learning_rate}"
# Each method is a set of training-script flags; every other flag is shared.
METHODS: dict[str, tuple[str, ...]] = {
    "linear_probe": ("--method", "linear_probe"),
    "finetune": ("--method", "finetune"),
    "adafilter": ("--method", "adafilter"),
    "adafilter_independent": ("--method", "adafilter", "--gate_network", "independent"),
    "adafilter_no_gated_norm": ("--method", "adafilter", "--gated_norm", "false"),
    # Lean gate networks (speed issue): kept only if paired runs at AdaFilter's LR and seeds show no accuracy loss.
    "adafilter_gates16": ("--method", "adafilter", "--gate_input_size", "16", "--gate_hidden_size", "16"),
    # Recipe variants after SpotTune (the authors' code), compared with AdaFilter's defaults on validation splits.
    # The default gated convs of EfficientNet plus its stem (whose F copy then trains, as fine-tuning trains it).
    "adafilter_gated_stem": (
        "--method",
        "adafilter",
        "--target_modules",
        r"embeddings\.convolution|encoder\..*depthwise_conv\.depthwise_conv|encoder\..*\.(project|expand)_conv|encoder\.top_conv",
    ),
    "adafilter_constant_noise": (
        "--method",
        "adafilter",
        "--gumbel_temperature_end",
        "5",
        "--gate_noise_end",
        "1",
    ),
    "adafilter_finetune_first": (
        "--method",
        "adafilter",
        "--gate_warmup_ratio",
        "0.5",
        "--gate_init_log_odds",
        "4",
        "--gate_regularization",
        "l1",
        "--gate_regularization_weight",
        "0.1",
    ),
    # SpotTune's optimiser for both methods: SGD with momentum, the gate network at the main LR (not 10x above).
    "finetune_sgd": ("--method", "finetune", "--optim", "sgd", "--optim_args", "momentum=0.9"),
    "adafilter_sgd": (
        "--method",
        "adafilter",
        "--optim",
        "sgd",
        "--optim_args",
        "momentum=0.9",
        "--gate_learning_rate",
        LEARNING_RATE,
    ),
    # Input resolution (replaces the budget's --image_size).
    "finetune_128px": ("--method", "finetune", "--image_size", "128"),
    "adafilter_128px": ("--method", "adafilter", "--image_size", "128"),
    "l2sp": ("--method", "l2sp"),
    "lora": ("--method", "lora"),
    "bitfit": ("--method", "bitfit"),
}
METHOD_TITLES = {
    "linear_probe": "linear probe",
    "finetune": "standard fine-tuning",
    "adafilter": "AdaFilter (LSTM gates, gated BN)",
    "adafilter_independent": "AdaFilter, independent gates (ablation)",
    "adafilter_no_gated_norm": "AdaFilter, no gated BN (ablation)",
    "adafilter_gates16": "AdaFilter, gate network 16 wide (lean)",
    "adafilter_gated_stem": "AdaFilter, stem gated (trained in F)",
    "adafilter_constant_noise": "AdaFilter, constant temperature 5 and noise (SpotTune)",
    "adafilter_finetune_first": "AdaFilter, fine-tune first, then gate (L1 towards S)",
    "finetune_sgd": "standard fine-tuning, SGD momentum 0.9",
    "adafilter_sgd": "AdaFilter, SGD momentum 0.9, gate LR = LR",
    "finetune_128px": "standard fine-tuning, 128 px",
    "adafilter_128px": "AdaFilter, 128 px",
    "l2sp": "L2-SP fine-tuning",
    "lora": "LoRA (PEFT)",
    "bitfit": "BitFit (biases, norms, head)",
}
# The paper's comparison (default), and with --extended the methods a user would otherwise pick.
CORE_METHODS = ("linear_probe", "finetune", "adafilter", "adafilter_independent", "adafilter_no_gated_norm")
EXTENDED_METHODS = (*CORE_METHODS, "l2sp", "lora", "bitfit")
ADAFILTER_METHODS = tuple(m for m in METHODS if m.startswith("adafilter"))
# Gate-network variants measured against AdaFilter's defaults at its chosen LR and seeds (paired).
LEAN_GATE_METHODS = ("adafilter_gates16",)
RECIPE_VARIANTS = ("adafilter_gated_stem", "adafilter_constant_noise", "adafilter_finetune_first")
SGD_GRID = (1e-2, 3e-2, 1e-1)
# Methods with an optimiser of their own (SGD) take a grid of their own; the other variants take the LR of the
# method they vary.
OWN_OPTIMIZER = ("finetune_sgd", "adafilter_sgd")
# Few trainable parameters on frozen features (a head, LoRA, biases) want a larger step.
FEW_PARAMETERS = ("linear_probe", "lora", "bitfit")
# The grid each method's learning rate is chosen from on validation: three values, the same size for every method.
LEARNING_RATE_GRIDS: dict[str, tuple[float, ...]] = {
    "linear_probe": (3e-3, 1e-2, 3e-2),
    "finetune": (3e-4, 1e-3, 3e-3),
    "adafilter": (3e-4, 1e-3, 3e-3),
    "l2sp": (3e-4, 1e-3, 3e-3),
    "lora": (1e-3, 3e-3, 1e-2),
    "bitfit": (1e-3, 3e-3, 1e-2),
} | dict.fromkeys(OWN_OPTIMIZER, SGD_GRID)
# Ablations and variants that take the LR chosen for the method they vary instead of a grid of their own.
SHARED_LEARNING_RATE = {
    m: "adafilter" for m in ADAFILTER_METHODS if m not in ("adafilter", *OWN_OPTIMIZER)
} | {"finetune_128px": "finetune"}


def method_flags(method: str, learning_rate: float) -> list[str]:
    """The method's training-script flags, `LEARNING_RATE` replaced by the run's."""
    return [f"{learning_rate:g}" if flag == LEARNING_RATE else flag for flag in METHODS[method]]
