"""Speed and memory of AdaFilter against standard fine-tuning of the same backbone.

For each model config it measures, in one run with the variants interleaved (ABCABC...) and medians over repeated
steps after warm-up:

- the training step (forward, backward, AdamW step) of AdaFilter vs fine-tuning every parameter of the plain
  backbone + linear head, as a ratio;
- the peak memory of one training run per variant, each in its own subprocess (CPU: peak RSS; CUDA:
  `torch.cuda.max_memory_allocated`), as a ratio;
- inference latency (eval mode, no grad) at batch 1 and batch 32 of AdaFilter vs the plain backbone, as ratios.

AdaFilter runs twice: with the reference two-bank layers ("before") and with the fast paths ("after").

    python benchmarks/speed.py                      # CPU, writes benchmarks/results/speed.md
    python benchmarks/speed.py --device cuda        # GPU rows, fp32 and bf16
    python benchmarks/speed.py --quick              # smoke run on tiny models, a few seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hf_adafilter import AdaFilterForImageClassification  # noqa: E402
from hf_adafilter.modeling.backbones import get_family  # noqa: E402
from hf_adafilter.modeling.bank_ops import BankOp, bank_op, depthwise_weight_grad_is_faster  # noqa: E402
from hf_adafilter.modeling.layers import gated_implementation  # noqa: E402

NUM_LABELS = 10
VARIANTS = ("finetune", "reference", "fast", "lean")
# Memory only: the default fast paths with gradient checkpointing (banks recomputed in backward).
MEMORY_VARIANTS = (*VARIANTS, "checkpointed")
VARIANT_TITLES = {
    "finetune": "fine-tuning / plain",
    "reference": "AdaFilter before",
    "fast": "AdaFilter after",
    "lean": "AdaFilter after, lean gates",
}
# Inference only: the default fast paths trusting version counters for the folded weights (no checksum per call).
VERSION_CHECK = "fast_version_check"
# The lean gate network: 16 wide instead of 64 (same accuracy on the short transfer preset, see the README).
LEAN_GATES = {"gate_input_size": 16, "gate_hidden_size": 16}
DW_METRIC = "train_step_fast_depthwise_baseline"
# Training: ResNet-50's step as measured; Lite0's like for like (fine-tuning given the same depthwise kernel).
# Distinct input batches the inference timings cycle through.
INFER_INPUTS = 4
# Ratio targets per metric, one number or one per backbone type (`model.config.model_type`); the inference ones are
# met with trained gates (`--trained_model`); "static" is the static export's at every batch size.
TARGETS: dict[str, float | dict[str, float]] = {
    "train_step": 1.8,
    DW_METRIC: 1.7,
    "infer_b1": {"efficientnet": 1.45, "resnet": 1.3},
    "infer_b32": 1.25,
    "peak_memory": 1.5,
    "static": 1.05,
}


def target_of(metric: str, model_type: str) -> float | None:
    target = TARGETS.get(metric)
    return target.get(model_type) if isinstance(target, dict) else target


def _target_text(metric: str) -> str:
    target = TARGETS[metric]
    if isinstance(target, dict):
        return ", ".join(f"{kind} <= {value}x" for kind, value in target.items())
    return f"<= {target}x"


@dataclass(frozen=True)
class ModelConfig:
    """One benchmarked backbone: how to build the plain classifier, and the input sizes per device."""

    name: str
    model_type: str  # transformers' `config.model_type`: what the targets are keyed by
    build: Callable[[], transformers.PreTrainedModel]
    image_size: dict[str, int]
    train_batch: dict[str, int]
    infer_batches: tuple[int, ...] = (1, 32)


def _lite0() -> transformers.PreTrainedModel:
    """ImageNet EfficientNet-Lite0 with a fresh 10-class head."""
    from hf_adafilter.packaged.pretrained import load_packaged_backbone

    pretrained, _ = load_packaged_backbone("efficientnet-lite0")
    config = pretrained.config.to_dict()
    for key in ("id2label", "label2id", "architectures"):
        config.pop(key, None)
    torch.manual_seed(0)
    model = transformers.EfficientNetForImageClassification(
        transformers.EfficientNetConfig(**{**config, "num_labels": NUM_LABELS})
    )
    model.efficientnet.load_state_dict(pretrained.efficientnet.state_dict())
    return model


def _resnet50() -> transformers.PreTrainedModel:
    """ResNet-50's shape (transformers' default ResNetConfig), random weights."""
    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=NUM_LABELS))


def _tiny_resnet() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_LABELS
    )
    return transformers.ResNetForImageClassification(config)


CONFIGS = {
    "efficientnet-lite0": ModelConfig(
        "efficientnet-lite0",
        "efficientnet",
        _lite0,
        image_size={"cpu": 128, "cuda": 128},
        train_batch={"cpu": 32, "cuda": 32},
    ),
    "resnet-50": ModelConfig(
        "resnet-50",
        "resnet",
        _resnet50,
        image_size={"cpu": 128, "cuda": 224},
        train_batch={"cpu": 8, "cuda": 16},
    ),
    "tiny-resnet": ModelConfig(
        "tiny-resnet",
        "resnet",
        _tiny_resnet,
        image_size={"cpu": 32, "cuda": 32},
        train_batch={"cpu": 4, "cuda": 4},
        infer_batches=(1, 4),
    ),
}


@dataclass
class Settings:
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int = 2
    warmup: int = 2
    train_repeats: int = 7
    infer_repeats: int = 15
    memory_steps: int = 3


# ----------------------------------------------------------------------------- building and stepping


def build_variant(config: ModelConfig, variant: str) -> transformers.PreTrainedModel:
    """The fine-tuning baseline (every parameter trainable) or AdaFilter wrapped around the same backbone."""
    plain = config.build()
    if variant == "finetune":
        return plain.requires_grad_(True)
    torch.manual_seed(0)
    gate_sizes = LEAN_GATES if variant == "lean" else {}
    model = AdaFilterForImageClassification.from_backbone(plain, num_labels=NUM_LABELS, **gate_sizes)
    if variant == "checkpointed":
        model.activation_checkpointing_enable()
    return model


class _DepthwiseFastWeightGrad(torch.autograd.Function):
    """A depthwise conv whose weight gradient is AdaFilter's (`bank_ops.depthwise_weight_grad`)."""

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, weight: torch.Tensor, op: BankOp) -> torch.Tensor:
        ctx.op = op
        ctx.save_for_backward(hidden_states, weight)
        return op(hidden_states, weight, None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden_states, weight = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], False)
        grad_input, grad_weight, _ = ctx.op.backward(grad, hidden_states, weight, False, mask)
        return grad_input, grad_weight, None


def give_fast_depthwise_grad(model: torch.nn.Module) -> int:
    """Lets plain fine-tuning use the depthwise weight-gradient kernel of AdaFilter's fused path, so its share of
    the speed-up can be told apart from AdaFilter's own; returns how many convs were switched."""
    switched = 0
    for module in model.modules():
        op = bank_op(module) if isinstance(module, torch.nn.Conv2d) else None
        if (
            op is None
            or module.bias is not None
            or not depthwise_weight_grad_is_faster(module.weight, op.groups)
        ):
            continue

        def forward(hidden_states, module=module, op=op):
            return _DepthwiseFastWeightGrad.apply(op.prepare(module, hidden_states), module.weight, op)

        module.forward = forward
        switched += 1
    return switched


def implementation_of(variant: str) -> str:
    return "reference" if variant == "reference" else "auto"


def autocast_context(settings: Settings) -> contextlib.AbstractContextManager:
    if settings.dtype == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[settings.dtype]
    return torch.autocast(settings.device, dtype=dtype)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_train_step(
    model: transformers.PreTrainedModel, variant: str, batch: int, size: int, settings: Settings
) -> Callable[[], None]:
    """One AdamW step on a fixed random batch, run under the variant's implementation."""
    device = settings.device
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=generator).to(device)

    def step() -> None:
        with gated_implementation(model, implementation_of(variant)), autocast_context(settings):
            optimizer.zero_grad(set_to_none=True)
            loss = model(pixels, labels=labels).loss
            loss.backward()
            optimizer.step()

    return step


def make_inference(
    model: transformers.PreTrainedModel,
    variant: str,
    batch: int,
    size: int,
    settings: Settings,
    folded_weights_check: str | None = None,
) -> Callable[[], None]:
    """Eval-mode forwards without grad, each on the next of a few fixed random batches: consecutive calls see
    different images, as in serving (AdaFilter's batch-1 kernels are updated only where the decisions change).
    `folded_weights_check` overrides the model's `config.folded_weights_check` during these calls."""
    device = settings.device
    model.to(device).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(batch, 3, size, size, generator=generator).to(device) for _ in range(INFER_INPUTS)]
    inputs = itertools.cycle(batches)

    def forward() -> None:
        with (
            gated_implementation(model, implementation_of(variant)),
            folded_weights_check_of(model, folded_weights_check),
            autocast_context(settings),
            torch.no_grad(),
        ):
            model(next(inputs))

    return forward


@contextlib.contextmanager
def folded_weights_check_of(model: torch.nn.Module, check: str | None) -> Iterator[None]:
    """`model.config.folded_weights_check = check` inside the block (None: as configured), restored after."""
    config = getattr(model, "config", None)
    if check is None or config is None:
        yield
        return
    previous, config.folded_weights_check = config.folded_weights_check, check
    try:
        yield
    finally:
        config.folded_weights_check = previous


def time_interleaved(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, device: str
) -> dict[str, float]:
    """Median seconds per call of each step, calling them in turn (ABCABC...) so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# ----------------------------------------------------------------------------- peak memory, one subprocess each


def _rss_bytes(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process.

    Not `getrusage().ru_maxrss`: Linux carries it over from the parent through fork and exec, so a probe started by
    a benchmark that has already grown would report the parent's peak.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def memory_probe(config: ModelConfig, variant: str, settings: Settings) -> dict[str, float]:
    """Peak memory of a few training steps of one variant (run inside a fresh subprocess)."""
    torch.set_num_threads(settings.threads)
    device = settings.device
    model = build_variant(config, variant)
    step = make_train_step(model, variant, config.train_batch[device], config.image_size[device], settings)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    for _ in range(settings.memory_steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_bytes("VmHWM")
    return {"peak": float(peak), "before_training": float(before)}


def run_memory_probes(config: ModelConfig, settings: Settings) -> dict[str, dict[str, float]]:
    results = {}
    for variant in MEMORY_VARIANTS:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--probe-memory",
            config.name,
            variant,
            "--device",
            settings.device,
            "--dtype",
            settings.dtype,
            "--threads",
            str(settings.threads),
            "--memory-steps",
            str(settings.memory_steps),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
        if completed.returncode != 0:
            raise RuntimeError(f"memory probe {config.name}/{variant} failed:\n{completed.stderr[-3000:]}")
        results[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
    return results


# ----------------------------------------------------------------------------- one config


@dataclass
class ConfigResult:
    name: str
    model_type: str
    device: str
    dtype: str
    image_size: int
    train_batch: int
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> variant -> median s
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> peak, before_training


def benchmark_config(config: ModelConfig, settings: Settings, measure_memory: bool = True) -> ConfigResult:
    device = settings.device
    size, batch = config.image_size[device], config.train_batch[device]
    result = ConfigResult(config.name, config.model_type, device, settings.dtype, size, batch)
    models = {variant: build_variant(config, variant) for variant in VARIANTS}
    # The fast and reference AdaFilter must be the same model: copy the weights, not just the seed.
    models["fast"].load_state_dict(models["reference"].state_dict())
    steps = {v: make_train_step(m, v, batch, size, settings) for v, m in models.items()}
    finetune_dw = build_variant(config, "finetune")
    if give_fast_depthwise_grad(finetune_dw):
        steps["finetune_dw"] = make_train_step(finetune_dw, "finetune", batch, size, settings)
    train = time_interleaved(steps, settings.warmup, settings.train_repeats, device)
    result.seconds["train_step"] = {v: train[v] for v in VARIANTS}
    if "finetune_dw" in train:
        result.seconds[DW_METRIC] = {**result.seconds["train_step"], "finetune": train["finetune_dw"]}
    del finetune_dw
    for infer_batch in config.infer_batches:
        forwards = {v: make_inference(m, v, infer_batch, size, settings) for v, m in models.items()}
        forwards[VERSION_CHECK] = make_inference(
            models["fast"], "fast", infer_batch, size, settings, "version"
        )
        repeats = settings.infer_repeats * (3 if infer_batch == 1 else 1)
        warmup = settings.warmup * (3 if infer_batch == 1 else 1)
        result.seconds[f"infer_b{infer_batch}"] = time_interleaved(forwards, warmup, repeats, device)
    del models, steps
    if measure_memory:
        result.memory = run_memory_probes(config, settings)
    return result


# ----------------------------------------------------------------------------- inference cost-model sweep

# (in, out, map size, kernel, groups): Lite0 and ResNet-50 layers at the benchmark's input sizes.
SWEEP_LAYERS = (
    (16, 96, 64, 1, 1),
    (96, 96, 64, 3, 96),
    (24, 144, 32, 1, 1),
    (144, 24, 32, 1, 1),
    (240, 240, 16, 5, 240),
    (80, 480, 8, 1, 1),
    (480, 80, 8, 1, 1),
    (192, 1152, 4, 1, 1),
    (320, 1280, 4, 1, 1),
    (64, 64, 32, 3, 1),
    (256, 256, 8, 3, 1),
)


def layer_sweep(settings: Settings, batches: tuple[int, ...] = (1, 32), repeats: int = 7) -> list[str]:
    """Median time of one folded inference layer as per-example merged kernels and as both banks plus a select,
    with the cost model's pick: the measurements `kernel_choice.prefer_merged` is calibrated on."""
    from hf_adafilter.modeling.bank_ops import BankOp
    from hf_adafilter.modeling.gated_inference import FoldedBanks, merged_forward, two_bank_forward
    from hf_adafilter.modeling.kernel_choice import prefer_merged

    rows = [
        "| layer (in -> out, map, kernel, groups) | batch | merged | two banks + select | cost model picks |",
        "|---|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for channels_in, channels_out, size, kernel, groups in SWEEP_LAYERS:
        shape = (channels_out, channels_in // groups, kernel, kernel)
        weight_finetuned, weight_pretrained = (
            torch.randn(shape, generator=generator),
            torch.randn(shape, generator=generator),
        )
        bias_finetuned, bias_pretrained = torch.randn(channels_out), torch.randn(channels_out)
        joined = torch.cat((weight_finetuned, weight_pretrained)) if groups == 1 else None
        joined_bias = torch.cat((bias_finetuned, bias_pretrained)) if groups == 1 else None
        folded = FoldedBanks(
            (), weight_finetuned, weight_pretrained, bias_finetuned, bias_pretrained, joined, joined_bias
        )
        op = BankOp(linear=False, groups=groups, padding=(kernel // 2, kernel // 2))
        for batch in batches:
            pixels = torch.randn(batch, channels_in, size, size, generator=generator)
            gates = (torch.rand(batch, channels_out, generator=generator) > 0.5).float()
            with torch.no_grad():
                seconds = time_interleaved(
                    {
                        "merged": functools.partial(merged_forward, op, pixels, gates, folded),
                        "two-bank": functools.partial(two_bank_forward, op, pixels, gates, folded),
                    },
                    warmup=2,
                    repeats=repeats,
                    device="cpu",
                )
            pick = "merged" if prefer_merged(op, weight_finetuned, size * size, batch) else "two-bank"
            faster = min(seconds, key=seconds.get)
            rows.append(
                f"| {channels_in} -> {channels_out}, {size}x{size}, {kernel}x{kernel}, {groups} | {batch} "
                f"| {seconds['merged'] * 1e3:.2f} ms | {seconds['two-bank'] * 1e3:.2f} ms "
                f"| {pick}{'' if pick == faster else ' (slower)'} |"
            )
    return rows


# ----------------------------------------------------------------------------- trained gates, real images


def _real_pixels(split, processor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    from hf_adafilter.data.images import decode_image, to_rgb

    dataset, image_column, label_column = split
    rows = dataset.select(range(min(count, len(dataset))))
    images = [to_rgb(decode_image(value)) for value in rows[image_column]]
    return processor(images, return_tensors="pt")["pixel_values"], torch.tensor(rows[label_column])


def disagreement(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Share of (batch, filter) pairs on which the images of a batch decide differently, every filter once."""
    from hf_adafilter.modeling.kernel_choice import disagreeing_share

    shares, widths = [], []
    with torch.no_grad():
        for pixels in batches:
            for gates in model(pixels).gates:
                shares.append(disagreeing_share(gates))
                widths.append(gates.shape[1])
    return sum(s * w for s, w in zip(shares, widths, strict=True)) / sum(widths)


SERVING_BATCHES = (1, 32)


def trained_gates_section(model_dirs: Sequence[Path], settings: Settings) -> list[str]:
    """Inference of trained models (gates as training left them) on real validation images, each against the plain
    backbone of the same architecture (`export_bank("pretrained")`) and its static export (calibrated on 256
    training images), with the accuracy each gets on the validation images."""
    from hf_adafilter.data import load_default_dataset

    torch.set_num_threads(settings.threads)
    data = load_default_dataset(train_val_split=None)
    rows, notes = [], []
    for model_dir in model_dirs:
        model_rows, model_notes = _trained_model_rows(Path(model_dir), data, settings)
        rows += model_rows
        notes += model_notes
    targets = "; ".join(f"batch {batch}: {_target_text(f'infer_b{batch}')}" for batch in SERVING_BATCHES)
    header = [
        "### Trained gates, real validation images",
        "",
        "Each model's gates as its training left them, on the embedded Fashion-MNIST validation images; the static "
        f"export is calibrated on 256 training images. Targets over the plain backbone: {targets}; static export "
        f"<= {TARGETS['static']}x.",
        "",
        '| model | batch | plain backbone | AdaFilter | ratio | AdaFilter, `folded_weights_check="version"` '
        "| ratio | static export | ratio | filters the batch disagrees on | target (AdaFilter; static) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return [*header, *rows, "", *notes]


def _trained_model_rows(model_dir: Path, data, settings: Settings) -> tuple[list[str], list[str]]:
    """One trained model's table rows and notes, on the embedded dataset `data` (loaded once for every model)."""
    from transformers import AutoImageProcessor

    model = AdaFilterForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model_type = model.config.backbone_config.model_type
    calibration, _ = _real_pixels(
        (data.require("train"), data.image_column, data.label_column), processor, 256
    )
    pixels, labels = _real_pixels((data.validation, data.image_column, data.label_column), processor, 512)
    variants = {
        "plain": model.export_bank("pretrained"),
        "adafilter": model,
        "static": model.export_static(calibration.split(64)),
    }
    with torch.no_grad():
        accuracy = {
            name: float(
                (torch.cat([m(b).logits for b in pixels.split(64)]).argmax(-1) == labels).float().mean()
            )
            for name, m in variants.items()
            if name != "plain"
        }
    agreement = variants["static"].config.adafilter_static["agreement"]
    name = f"{model_dir.name} ({model_type}, {pixels.shape[-1]} px)"
    notes = [
        f"{name}: calibration agreement {agreement:.3f}; validation accuracy on {len(labels)} images: learned "
        f"gates {accuracy['adafilter']:.4f}, static export {accuracy['static']:.4f}."
    ]
    rows = []
    for batch in SERVING_BATCHES:
        chunks = list(pixels.split(batch))[:8]
        share = disagreement(model, chunks) if batch > 1 else 0.0

        def forward(module, check=None, chunks=chunks):
            inputs = itertools.cycle(chunks)

            def call():
                with folded_weights_check_of(module, check), torch.no_grad():
                    module(next(inputs))

            return call

        calls = {
            "plain": forward(variants["plain"]),
            "adafilter": forward(model),
            "version": forward(model, "version"),
            "static": forward(variants["static"]),
        }
        if batch == 1:  # where the time goes: the gate network alone, and the layers without it
            calls["gate network"] = gate_network_call(model, chunks[0])
            calls["forced"] = forward(ForcedGates(model, 1.0))
        repeats = settings.infer_repeats * (3 if batch == 1 else 1)
        seconds = time_interleaved(calls, settings.warmup * 2, repeats, settings.device)
        plain = seconds["plain"]
        ratio = {key: value / plain for key, value in seconds.items()}
        if batch == 1:
            notes.append(f"{name}, batch 1, where the time goes: the gate network alone "
                         f"({len(model.gated_layer_names)} controller steps on an image's pooled inputs) "
                         f"{seconds['gate network'] * 1e3:.1f} ms ({ratio['gate network']:.2f}x the plain backbone); "
                         f"the model with every gate forced to F (no gate network, version check) {seconds['forced'] * 1e3:.1f} ms "
                         f"({ratio['forced']:.2f}x).")  # fmt: skip
        target, static = target_of(f"infer_b{batch}", model_type), TARGETS["static"]
        verdict = (
            f"<= {target}x ({'meets' if ratio['adafilter'] <= target else 'misses'}); <= {static}x "
            f"({'meets' if ratio['static'] <= static else 'misses'})"
            if target
            else ""
        )
        rows.append(
            f"| {name} | {batch} | {plain * 1e3:.1f} ms | {seconds['adafilter'] * 1e3:.1f} ms | "
            f"**{ratio['adafilter']:.2f}x** | {seconds['version'] * 1e3:.1f} ms | **{ratio['version']:.2f}x** | "
            f"{seconds['static'] * 1e3:.1f} ms | **{ratio['static']:.2f}x** | {share:.1%} | {verdict} |"
        )
    return rows, notes


class ForcedGates(torch.nn.Module):
    """`model` called with every gate forced to `value` (and the version check): the cost of the gated layers
    without the gate network."""

    def __init__(self, model: AdaFilterForImageClassification, value: float) -> None:
        super().__init__()
        self.model, self.value = model, value

    def forward(self, pixels: torch.Tensor):
        with self.model.forced_gates(self.value), folded_weights_check_of(self.model, "version"):
            return self.model(pixels)


def gate_network_call(model: AdaFilterForImageClassification, pixels: torch.Tensor):
    """A call that runs only the gate network: every controller step on the pooled inputs `pixels` gave."""
    controller, pooled = model.adafilter.gate_controller, []
    handle = controller.register_forward_pre_hook(lambda _, args: pooled.append((args[0], args[1].clone())))
    try:
        with torch.no_grad():
            model(pixels)
    finally:
        handle.remove()

    def call():
        state = None
        with torch.no_grad():
            for index, features in pooled:
                _, _, state = controller(index, features, state)

    return call


# ----------------------------------------------------------------------------- torch.compile at batch 1


def compile_section(settings: Settings, config_name: str = "efficientnet-lite0") -> list[str]:
    """Batch-1 inference eager vs `torch.compile` (inductor, default mode): transformers' model as it is built, the
    same model after the family's prepare (its pooler a global pool), and AdaFilter (default and lean gates)."""
    config = CONFIGS[config_name]
    size = config.image_size[settings.device]
    as_built = config.build().eval()
    prepared = config.build().eval()
    get_family(prepared.config.model_type).prepare(prepared)
    models = {  # title: (model, variant)
        "plain, as transformers builds it": (as_built, "finetune"),
        "plain, after the family's prepare": (prepared, "finetune"),
        "AdaFilter": (build_variant(config, "fast").eval(), "fast"),
        "AdaFilter, lean gates": (build_variant(config, "lean").eval(), "lean"),
    }
    calls, compile_seconds = {}, {}
    for name, (model, variant) in models.items():
        calls[f"{name}|eager"] = make_inference(model, variant, 1, size, settings)
        compiled = make_inference(torch.compile(model), variant, 1, size, settings)
        start = time.perf_counter()
        compiled()  # compiles
        compile_seconds[name] = time.perf_counter() - start
        calls[f"{name}|compiled"] = compiled
    seconds = time_interleaved(calls, settings.warmup * 3, settings.infer_repeats * 3, settings.device)
    plain = seconds["plain, as transformers builds it|eager"]
    lines = [
        f"### torch.compile, inference at batch 1 ({config_name}, {size} px, {settings.dtype})",
        "",
        "| model | eager | compiled | compiled / eager | eager / plain eager | compiled / plain eager | compile time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in models:
        eager, compiled = seconds[f"{name}|eager"], seconds[f"{name}|compiled"]
        lines.append(
            f"| {name} | {eager * 1e3:.2f} ms | {compiled * 1e3:.2f} ms | {compiled / eager:.2f}x "
            f"| {eager / plain:.2f}x | {compiled / plain:.2f}x | {compile_seconds[name]:.0f} s |"
        )
    return lines


# ----------------------------------------------------------------------------- report


def ratios(values: dict[str, float]) -> tuple[float, float, float]:
    """(before, after, lean): AdaFilter reference, fast and lean-gated fast, each over the fine-tuning / plain
    baseline."""
    base = values["finetune"]
    if not base:  # e.g. no measurable memory growth of a tiny model
        return (float("nan"),) * 3
    return values["reference"] / base, values["fast"] / base, values["lean"] / base


def _verdict(ratio: float, lean: float, target: float) -> str:
    return f"<= {target}x ({'meets' if ratio <= target else 'misses'}; lean {'meets' if lean <= target else 'misses'})"


def result_rows(result: ConfigResult) -> list[str]:
    rows = []
    labels = {
        "train_step": f"training step, batch {result.train_batch}",
        "infer_b1": "inference, batch 1",
        "infer_b32": "inference, batch 32",
        "infer_b4": "inference, batch 4",
        DW_METRIC: "training step vs fine-tuning given AdaFilter's depthwise weight-gradient kernel",
    }
    for metric, values in result.seconds.items():
        before, after, lean = ratios(values)
        target = target_of(metric, result.model_type)
        rows.append(
            f"| {result.name} | {result.image_size} | {result.dtype} | {labels.get(metric, metric)} "
            f"| {values['finetune'] * 1e3:.1f} ms | {values['reference'] * 1e3:.1f} ms | {before:.2f}x "
            f"| {values['fast'] * 1e3:.1f} ms | **{after:.2f}x** | {values['lean'] * 1e3:.1f} ms | **{lean:.2f}x** "
            f"| {_verdict(after, lean, target) if target else ''} |"
        )
        if VERSION_CHECK in values:
            rows.append(
                f"| {result.name} | {result.image_size} | {result.dtype} | {labels.get(metric, metric)}, "
                f'`folded_weights_check="version"` | {values["finetune"] * 1e3:.1f} ms | | '
                f"| {values[VERSION_CHECK] * 1e3:.1f} ms | **{values[VERSION_CHECK] / values['finetune']:.2f}x** "
                "| | | |"
            )
    if result.memory:
        unit = "RSS" if result.device == "cpu" else "allocated"
        peaks = {v: m["peak"] for v, m in result.memory.items()}
        growth = {v: m["peak"] - m["before_training"] for v, m in result.memory.items()}
        for label, sizes, target in (
            (f"training peak {unit}", peaks, target_of("peak_memory", result.model_type)),
            (f"training growth of {unit} (peak - after build)", growth, None),
        ):
            before, after, lean = ratios(sizes)
            mib = {v: f"{size / 2**20:.0f} MiB" for v, size in sizes.items()}
            rows.append(
                f"| {result.name} | {result.image_size} | {result.dtype} | {label} | {mib['finetune']} "
                f"| {mib['reference']} | {before:.2f}x | {mib['fast']} | **{after:.2f}x** | {mib['lean']} "
                f"| **{lean:.2f}x** | {_verdict(after, lean, target) if target else ''} |"
            )
        if "checkpointed" in peaks:
            rows.append(
                f"| {result.name} | {result.image_size} | {result.dtype} | training peak {unit}, gradient "
                f"checkpointing | {peaks['finetune'] / 2**20:.0f} MiB | | | {peaks['checkpointed'] / 2**20:.0f} MiB "
                f"| **{peaks['checkpointed'] / peaks['finetune']:.2f}x** | | | |"
            )
    return rows


def machine_description(settings: Settings) -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    lines = [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; `torch.set_num_threads({settings.threads})`",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
    ]
    if settings.device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    return lines


def render(results: list[ConfigResult], settings: Settings, command: str, load: tuple[str, str]) -> str:
    header = [
        "| model | px | dtype | metric | fine-tuning / plain | AdaFilter before (reference) | before ratio "
        "| AdaFilter after (fast paths) | after ratio | AdaFilter after, lean gates (16 wide) | lean ratio | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [row for result in results for row in result_rows(result)]
    lines = [
        f"## {settings.device.upper()} ({', '.join(sorted({r.dtype for r in results}))})",
        "",
        f"Command: `{command}`",
        "",
        *machine_description(settings),
        f"- load average (1 min) at start / end: {load[0]} / {load[1]}",
        f"- medians of {settings.train_repeats} training steps and {settings.infer_repeats} (batch 1: "
        f"{3 * settings.infer_repeats}) inference calls after warm-up (each on the next of {INFER_INPUTS} random input "
        f"batches), variants interleaved; peak memory from "
        f"{settings.memory_steps} training steps in a fresh subprocess per variant",
        "",
        *header,
        *rows,
        "",
    ]
    return "\n".join(lines)


GPU_PLACEHOLDER = (
    "## CUDA\n\nNot measured: the machine these results come from has no GPU. On a GPU machine, "
    "`python benchmarks/speed.py --device cuda` fills this section with fp32 and bf16 rows (ResNet-50 at 224 px, "
    "batch 16; peak memory from `torch.cuda.max_memory_allocated`).\n"
)


def update_report(path: Path, device: str, section: str) -> None:
    """Replaces this device's section of the report, keeping the other device's and the hand-written notes."""
    sections = {"cpu": "", "cuda": GPU_PLACEHOLDER}
    notes = ""
    if path.exists():
        text = path.read_text()
        for name in sections:
            begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
            if begin in text and end in text:
                sections[name] = text.split(begin, 1)[1].split(end, 1)[0].strip("\n") + "\n"
        if NOTES_MARKER in text:
            notes = text[text.index(NOTES_MARKER) :]
    sections[device] = section
    parts = [REPORT_TITLE]
    for name, body in sections.items():
        parts.append(f"<!-- {name} -->\n{body}<!-- /{name} -->\n")
    path.write_text("\n".join(parts) + ("\n" + notes if notes else ""))


REPORT_TITLE = (
    "# AdaFilter speed and memory\n\n"
    "Written by `benchmarks/speed.py` (the sections between the markers); ratios are AdaFilter over standard "
    "fine-tuning of the same backbone (all parameters trainable, same AdamW, batch and input) for training, and "
    "over the plain backbone for inference. *Before* is the reference two-bank implementation "
    '(`gated_implementation(model, "reference")`), *after* the default fast paths.\n'
)
NOTES_MARKER = "## Notes"


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def run(
    configs: list[ModelConfig], settings: Settings, measure_memory: bool = True
) -> tuple[list[ConfigResult], tuple[str, str]]:
    torch.set_num_threads(settings.threads)
    start_load = _load_average()
    results = [benchmark_config(config, settings, measure_memory) for config in configs]
    return results, (start_load, _load_average())


def save_backbone(config: ModelConfig, directory: Path) -> None:
    """The config's plain classifier and transformers' default image processor for its type, saved to `directory`."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    model = config.build()
    model.save_pretrained(directory)
    processor_class = IMAGE_PROCESSOR_MAPPING_NAMES[model.config.model_type]["pil"]
    processor = getattr(transformers, processor_class)()
    processor.save_pretrained(directory)
    print(f"saved {config.name} ({type(model).__name__}, {type(processor).__name__}) to {directory}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "fp16", "all"],
        help="Autocast dtype; default fp32 on CPU, fp32 and bf16 ('all') on CUDA.",
    )
    parser.add_argument("--configs", default="efficientnet-lite0,resnet-50")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="Tiny model, few repeats: a smoke run.")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument(
        "--sweep", action="store_true", help="Also time merged vs two-bank inference per layer shape (CPU)."
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Also time batch-1 inference under torch.compile (Lite0, minutes).",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="Report to update (default: benchmarks/results/speed.md; --quick: none).",
    )
    parser.add_argument(
        "--trained_model",
        nargs="+",
        default=None,
        help="Also time inference of these saved models (e.g. the embedded default job's, outputs/fashion-mnist-"
        "adafilter) on the embedded validation images, each with its static export and its plain backbone.",
    )
    parser.add_argument(
        "--save_backbone",
        nargs=2,
        metavar=("CONFIG", "DIR"),
        help="Save CONFIG's plain classifier as benchmarked (ResNet-50: random weights) with an image processor to "
        "DIR, for `examples/run.py --model_name_or_path DIR` to train gates on, and exit.",
    )
    parser.add_argument("--probe-memory", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtypes = [args.dtype or ("all" if args.device == "cuda" else "fp32")]
    if dtypes == ["all"]:
        dtypes = ["fp32", "bf16"]
    settings = Settings(
        device=args.device, dtype=dtypes[0], threads=args.threads, memory_steps=args.memory_steps
    )
    if args.save_backbone:
        save_backbone(CONFIGS[args.save_backbone[0]], Path(args.save_backbone[1]))
        return
    if args.probe_memory:
        print(json.dumps(memory_probe(CONFIGS[args.probe_memory[0]], args.probe_memory[1], settings)))
        return
    names = ["tiny-resnet"] if args.quick else args.configs.split(",")
    if args.quick:
        settings.warmup, settings.train_repeats, settings.infer_repeats, settings.memory_steps = 1, 2, 2, 1
    command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = []
    for dtype in dtypes:
        settings.dtype = dtype
        results, load = run([CONFIGS[name] for name in names], settings, not args.no_memory)
        sections.append(render(results, settings, command.strip(), load))
    if args.sweep:
        sections.append(
            "### Inference cost model: one folded layer, merged vs two banks\n\n"
            + "\n".join(layer_sweep(settings))
            + "\n"
        )
    if args.trained_model:
        sections.append(
            "\n".join(trained_gates_section([Path(d) for d in args.trained_model], settings)) + "\n"
        )
    if args.compile:
        sections.append("\n".join(compile_section(settings)) + "\n")
    report = "\n".join(sections)
    print(report)
    output = args.output or (None if args.quick else str(ROOT / "benchmarks" / "results" / "speed.md"))
    if output:
        update_report(Path(output), args.device, report)


if __name__ == "__main__":
    main()
