"""The fast paths (fused training, folded / merged inference, lean gate controller) against the reference layers.

Every fast path must compute what the reference two-bank path computes: in float64 to 1e-9 (any real mistake is
orders of magnitude larger), in float32 to 1e-5, with identical gate decisions and identical BatchNorm running
statistics and counters.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import transformers
from conftest import load_script, perturb_finetuned_bank, random_backbone
from conftest import pixel_batch as cpu_pixel_batch
from torch import nn

from hf_adafilter import AdaFilterConfig, AdaFilterForImageClassification
from hf_adafilter.modeling import kernel_choice, layers
from hf_adafilter.modeling.backbones import weight_standardization_eps
from hf_adafilter.modeling.bank_ops import BankOp, bank_op, depthwise_weight_grad, joins_well
from hf_adafilter.modeling.gating import GateController, gate_forward
from hf_adafilter.modeling.kernel_choice import prefer_merged, prefer_split
from hf_adafilter.modeling.layers import GatedLayer, gated_implementation

FP64_TOLERANCE = 1e-9
FP32_TOLERANCE = 1e-5
# Where the model-level equivalence tests run: the CPU, or the GPU `benchmarks/gpu_check.py` runs them on.
DEVICE = torch.device(os.environ.get("HF_ADAFILTER_TEST_DEVICE", "cpu"))
LABELS = torch.tensor([0, 1, 2, 3], device=DEVICE)
ROOT = Path(__file__).resolve().parents[1]


def perturbed_model(
    family: str, dtype: torch.dtype = torch.float64, **overrides
) -> AdaFilterForImageClassification:
    """Both banks (and norms) different, as after training, so a path that mixed them up would show."""
    model = AdaFilterForImageClassification.from_backbone(random_backbone(family), num_labels=5, **overrides)
    perturb_finetuned_bank(model, seed=3, scale=0.3, mean_shift=0.2, gain=1.3, bias_shift=0.1)
    return model.to(device=DEVICE, dtype=dtype)


def pixel_batch(batch_size: int = 4, seed: int = 1) -> torch.Tensor:
    return cpu_pixel_batch(batch_size, seed).to(DEVICE)


def run_step(model, implementation: str, pixels: torch.Tensor, train: bool, grad: bool = True):
    """One forward (and backward) under `implementation`; the loss also reaches the gates' gradient."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same Gumbel noise for both paths
    with gated_implementation(model, implementation), torch.set_grad_enabled(grad):
        out = model(pixels, labels=LABELS[: pixels.shape[0]] if grad else None)
        if grad:
            weights = [
                torch.linspace(0.1, 1.0, g.shape[1], dtype=g.dtype, device=g.device) for g in out.gates
            ]
            (out.loss + sum((g * w).mean() for g, w in zip(out.gates, weights, strict=True))).backward()
    # A compiled model names its parameters `_orig_mod.<name>`.
    grads = {
        name.removeprefix("_orig_mod."): p.grad.clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    return out, grads


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str, scale=None
) -> None:
    scale = expected.abs().max().item() if scale is None else scale
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * max(scale, 1e-12), f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def compare_runs(reference, fast, reference_model, fast_model, tolerance: float, grad_scale: str) -> None:
    (ref_out, ref_grads), (fast_out, fast_grads) = reference, fast
    assert_close(fast_out.logits, ref_out.logits, tolerance, "logits")
    assert all(torch.equal(a, b) for a, b in zip(ref_out.gates, fast_out.gates, strict=True)), (
        "gate decisions"
    )
    assert ref_grads.keys() == fast_grads.keys()
    # Per tensor in float64; in float32 against the model's gradient scale, since some gradients are zero in exact
    # arithmetic (the shift of a BatchNorm feeding another BatchNorm) and hold only rounding noise.
    overall = max(g.abs().max().item() for g in ref_grads.values())
    for name, expected in ref_grads.items():
        assert_close(fast_grads[name], expected, tolerance, name, overall if grad_scale == "model" else None)
    ref_buffers, fast_buffers = dict(reference_model.named_buffers()), dict(fast_model.named_buffers())
    for name, expected in ref_buffers.items():
        if expected.is_floating_point():
            assert_close(fast_buffers[name], expected, tolerance, name)
        else:
            assert torch.equal(fast_buffers[name], expected), name


# ----------------------------------------------------------------------------- training and autograd paths


@pytest.mark.parametrize("gated_norm", [True, False])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-with-grad"])
def test_fused_path_matches_reference_in_float64(family, gated_norm, train):
    model = perturbed_model(family, gated_norm=gated_norm)
    pixels = pixel_batch().double()
    ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
    reference = run_step(ref_model, "reference", pixels, train)
    fast = run_step(fast_model, "auto", pixels, train)
    compare_runs(reference, fast, ref_model, fast_model, FP64_TOLERANCE, grad_scale="tensor")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-with-grad"])
def test_fused_path_matches_reference_in_float32(family, train):
    model = perturbed_model(family, torch.float32)
    pixels = pixel_batch()
    if family == "mobilenet_v2" and train:
        # The tiny MobileNetV2 normalises 1x1 maps over a batch of 4: its float32 reference is itself ~4e-4 away
        # from float64. At 64 px and batch 4 the reference is accurate to ~1e-5, which a comparison can resolve.
        pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
    reference = run_step(ref_model, "reference", pixels, train)
    fast = run_step(fast_model, "auto", pixels, train)
    compare_runs(reference, fast, ref_model, fast_model, FP32_TOLERANCE, grad_scale="model")


def test_running_statistics_follow_cumulative_averaging():
    """momentum=None averages over all batches seen: num_batches_tracked drives the factor in both paths."""
    model = perturbed_model("resnet")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
    for step in range(3):
        pixels = pixel_batch(seed=step).double()
        reference = run_step(ref_model, "reference", pixels, True)
        fast = run_step(fast_model, "auto", pixels, True)
    compare_runs(reference, fast, ref_model, fast_model, FP64_TOLERANCE, grad_scale="tensor")


def test_fused_training_keeps_the_frozen_bank_bit_identical_and_moves_the_other():
    model = perturbed_model("efficientnet", torch.float32)
    layers = model.adafilter.gated_layers
    frozen = {k: v.clone() for k, v in model.adafilter.pretrained_state_dict().items()}
    finetuned = {name: layer.finetuned_layer.weight.clone() for name, layer in layers.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        run_step(model, "auto", pixel_batch(seed=step), True)
        optimizer.step()
    assert all(torch.equal(v, frozen[k]) for k, v in model.adafilter.pretrained_state_dict().items())
    assert all(layer.base_layer.weight.grad is None for layer in layers.values())
    assert any(not torch.equal(layer.finetuned_layer.weight, finetuned[n]) for n, layer in layers.items())


# ----------------------------------------------------------------------------- inference paths


@pytest.mark.parametrize("implementation", ["fused", "merged", "auto"])
@pytest.mark.parametrize("gated_norm", [True, False])
def test_inference_paths_match_reference(family, implementation, gated_norm):
    model = perturbed_model(family, torch.float32, gated_norm=gated_norm).eval()
    for batch in (1, 4):
        pixels = pixel_batch(batch_size=batch)
        with torch.no_grad():
            with gated_implementation(model, "reference"):
                reference = model(pixels)
            with gated_implementation(model, implementation):
                fast = model(pixels)
        assert_close(fast.logits, reference.logits, FP32_TOLERANCE, f"batch {batch} logits")
        assert all(torch.equal(a, b) for a, b in zip(reference.gates, fast.gates, strict=True))
    model64 = copy.deepcopy(model).double()
    with torch.no_grad(), gated_implementation(model64, implementation):
        pixels = pixel_batch().double()
        fast = model64(pixels).logits
        with gated_implementation(model64, "reference"):
            reference = model64(pixels).logits
    assert_close(fast, reference, FP64_TOLERANCE, "float64 logits")


def test_folded_banks_follow_in_place_updates():
    """The folded copies are cached: an optimizer step (in place) or load_state_dict must invalidate them."""
    model = perturbed_model("resnet", torch.float32).eval()
    pixels = pixel_batch()
    with torch.no_grad():
        before = model(pixels).logits
        for layer in model.adafilter.gated_layers.values():
            layer.finetuned_layer.weight.mul_(1.5)
            layer.finetuned_norm.running_var.mul_(2.0)
        after = model(pixels).logits
        with gated_implementation(model, "reference"):
            reference = model(pixels).logits
    assert not torch.allclose(before, after)
    assert_close(after, reference, FP32_TOLERANCE, "logits after in-place update")


def test_forced_gates_between_zero_and_one_mix_the_banks():
    model = perturbed_model("regnet", torch.float32).eval()
    with torch.no_grad(), model.forced_gates(0.25):
        for batch in (1, 3):
            pixels = pixel_batch(batch_size=batch)
            with gated_implementation(model, "reference"):
                reference = model(pixels).logits
            for implementation in ("fused", "merged"):
                with gated_implementation(model, implementation):
                    assert_close(model(pixels).logits, reference, FP32_TOLERANCE, implementation)


def test_incremental_batch_one_kernels_equal_fresh_ones_bit_for_bit(family, monkeypatch):
    """Batch-1 kernels updated where the gates changed (every kernel here, whatever its size) give the logits of
    kernels merged afresh, over a run of images, forced fractional gates, and an in-place parameter update."""
    model = perturbed_model(family, torch.float32).eval()
    images = [pixel_batch(batch_size=1, seed=seed) for seed in range(5)]

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            logits = [model(image).logits for image in images]
            with model.forced_gates(0.25):
                logits.append(model(images[0]).logits)
            logits.append(model(images[1]).logits)
            weight = next(iter(model.adafilter.gated_layers.values())).finetuned_layer.weight
            saved = weight.clone()
            weight.mul_(1.1)
            logits.append(model(images[2]).logits)
            weight.copy_(saved)
        return logits

    monkeypatch.setattr(layers, "prefer_live", lambda weight, batch: False)  # the folded banks at batch 1
    monkeypatch.setattr(kernel_choice, "INCREMENTAL_MIN_ELEMENTS", 1 << 60)
    fresh = run()
    monkeypatch.setattr(kernel_choice, "INCREMENTAL_MIN_ELEMENTS", 0)
    incremental = run()
    assert all(torch.equal(a, b) for a, b in zip(fresh, incremental, strict=True))
    kept = [layer._folded for layer in model.adafilter.gated_layers.values()]
    assert all(folded is not None and folded.last_merged is not None for folded in kept)
    copied = copy.deepcopy(model)  # the cache (with its lock) stays behind
    assert all(layer._folded is None for layer in copied.adafilter.gated_layers.values())


@pytest.mark.parametrize("gated_norm", [True, False])
def test_batch_one_reads_the_live_banks(family, gated_norm, monkeypatch):
    """Batch 1 merges the banks' own weights and norm statistics per call: the reference's per-filter choice bit for
    bit, nothing cached, and an edit through `.data` (which bumps no version) is seen with no check at all."""
    monkeypatch.setattr(kernel_choice, "INCREMENTAL_MIN_ELEMENTS", 1 << 60)  # no layer keeps a cached kernel
    model = perturbed_model(family, torch.float32, gated_norm=gated_norm).eval()
    model.config.folded_weights_check = "version"
    pixels = pixel_batch(batch_size=1)
    with torch.no_grad():
        with gated_implementation(model, "reference"):
            reference = model(pixels)
        live = model(pixels)
        assert torch.equal(live.logits, reference.logits)
        assert all(layer._folded is None for layer in model.adafilter.gated_layers.values())
        for layer in model.adafilter.gated_layers.values():
            layer.finetuned_layer.weight.data.mul_(1.5)
            if layer.finetuned_norm is not None:
                layer.finetuned_norm.running_mean.data.add_(0.5)
        edited = model(pixels).logits
        with gated_implementation(model, "reference"):
            reference = model(pixels).logits
    assert not torch.equal(edited, live.logits)
    assert torch.equal(edited, reference)


def test_cost_model_splits_batches_that_mostly_agree():
    """The split runs one bank plus the other for the differing filters: worth it while few differ, fewer on 4x4
    maps, where its fixed overhead weighs more (speed.md's notes)."""
    assert prefer_split(0.0, output_positions=16) and prefer_split(0.1, output_positions=16)
    assert not prefer_split(0.3, output_positions=16)
    assert prefer_split(0.5, output_positions=64) and not prefer_split(0.6, output_positions=64)


def test_cost_model_merges_batch_one_and_depthwise():
    pointwise = BankOp(linear=False)
    depthwise = BankOp(linear=False, groups=96)
    assert prefer_merged(pointwise, torch.empty(1280, 320, 1, 1), output_positions=16, batch=1)
    assert prefer_merged(pointwise, torch.empty(96, 16, 1, 1), output_positions=1024, batch=32)
    assert prefer_merged(depthwise, torch.empty(96, 1, 3, 3), output_positions=16, batch=32)
    assert not prefer_merged(pointwise, torch.empty(1280, 320, 1, 1), output_positions=16, batch=32)


def test_choices_off_cpu_follow_the_documented_device_rule():
    """CPU thresholds are measured; elsewhere (a "meta" tensor stands in for a GPU one) the rule is fixed: merge only
    at batch 1 and for depthwise kernels, join every ungrouped layer in training, rewrite batch-1 kernels whole."""
    pointwise, depthwise = BankOp(linear=False), BankOp(linear=False, groups=96)
    small_input = torch.empty(1, 16, 4, 4)
    for device in ("cpu", "meta"):
        weight = torch.empty(96, 16, 1, 1, device=device)
        on_cpu = device == "cpu"
        assert prefer_merged(pointwise, weight, output_positions=1024, batch=32) is on_cpu
        assert prefer_merged(pointwise, weight, output_positions=1024, batch=1)
        assert prefer_merged(
            depthwise, torch.empty(96, 1, 3, 3, device=device), output_positions=16, batch=32
        )
        large = torch.empty(1024, 1024, 1, 1, device=device)
        assert joins_well(pointwise, small_input.to(device), large) is not on_cpu
        assert not joins_well(depthwise, small_input.to(device), torch.empty(96, 1, 3, 3, device=device))
        assert kernel_choice.updates_incrementally(large) is on_cpu


# ----------------------------------------------------------------------------- layer types and fallbacks


class CustomForwardConv(nn.Conv2d):
    """A conv whose forward is not F.conv2d: only the reference path can be exact."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states) * 2.0


def standalone_layer(conv: nn.Module, norm: nn.Module | None = None) -> GatedLayer:
    # As the model builds it: the family's rule says whether the conv standardises its weights.
    layer = GatedLayer(conv, norm, weight_standardization_eps=weight_standardization_eps(conv))
    with torch.no_grad():
        layer.finetuned_layer.weight.mul_(1.2)
    # A layer outside a model: its gates come from a controller of its own, run in a `gate_forward` block.
    layer.test_controller = GateController([layer.in_channels], [layer.out_channels]).double()
    return layer.double()


def layer_outputs(layer: GatedLayer, implementation: str, pixels: torch.Tensor):
    layer = copy.deepcopy(layer)
    inputs = pixels.clone().requires_grad_()
    torch.manual_seed(0)
    with gated_implementation(layer, implementation), gate_forward(layer.test_controller):
        out = layer(inputs)
    out.pow(2).sum().backward()
    return out, inputs.grad, layer.finetuned_layer.weight.grad


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 4, padding="same"),  # even kernel: asymmetric "same" padding
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, stride=2),
        nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=False),  # depthwise, 5x5: the fast weight gradient
        nn.Conv2d(6, 6, 3, padding=1, groups=3),
        transformers.models.bit.modeling_bit.WeightStandardizedConv2d(4, 6, 3, padding="SAME", eps=1e-8),
        CustomForwardConv(4, 6, 3, padding=1),
    ],
    ids=[
        "same-even",
        "reflect",
        "dilated-strided",
        "depthwise-5x5",
        "grouped",
        "weight-standardized",
        "custom",
    ],
)
def test_conv_variants_match_reference(conv):
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(conv.out_channels)
    layer = standalone_layer(conv, norm).train()
    pixels = torch.randn(3, conv.in_channels, 9, 9, dtype=torch.float64)
    references = layer_outputs(layer, "reference", pixels)
    # Against the largest of the compared tensors: the weight-standardised conv's weight gradient is a
    # near-cancelling difference (~1e-6 of its terms), so its float64 rounding is judged at the scale of its terms.
    scale = max(reference.abs().max().item() for reference in references)
    for reference, fast in zip(references, layer_outputs(layer, "auto", pixels), strict=True):
        assert_close(fast, reference, FP64_TOLERANCE, type(conv).__name__, scale)
    assert (layer._bank_op() is None) == isinstance(conv, CustomForwardConv)


def test_channels_last_input_is_handled():
    layer = standalone_layer(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)).train()
    pixels = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    reference = layer_outputs(layer, "reference", pixels)
    fast = layer_outputs(layer, "auto", pixels.contiguous(memory_format=torch.channels_last))
    for a, b in zip(fast, reference, strict=True):
        assert_close(a, b, FP64_TOLERANCE, "channels-last")


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_weight_gradient_matches_aten(stride):
    conv = nn.Conv2d(5, 5, 7, stride=stride, padding=3, dilation=1, groups=5, bias=False).double()
    op = bank_op(conv)
    pixels = torch.randn(3, 5, 11, 11, dtype=torch.float64)
    grad = torch.randn_like(conv(pixels))
    expected = torch.ops.aten.convolution_backward(
        grad, pixels, conv.weight, None, [stride] * 2, [3, 3], [1, 1], False, [0, 0], 5, [False, True, False]
    )[1]
    assert_close(depthwise_weight_grad(grad, pixels, conv.weight.shape, op), expected, FP64_TOLERANCE, "dW")


# ----------------------------------------------------------------------------- the gate controller


@pytest.mark.parametrize("network", ["lstm", "gru", "independent"])
def test_lean_controller_gives_identical_decisions_and_gradients(network):
    """The inlined controller issues the same ATen calls as the modules: decisions and gradients bit-identical."""
    model = perturbed_model("resnet", torch.float32, gate_network=network)
    pixels = pixel_batch()
    for train in (True, False):
        ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
        with model.forced_gates(None):
            reference = run_step(ref_model, "reference", pixels, train)
            fast = run_step(fast_model, "auto", pixels, train)
        assert all(torch.equal(a, b) for a, b in zip(reference[0].gates, fast[0].gates, strict=True))
        for name, grad in reference[1].items():
            if "gate_controller" in name:
                assert_close(fast[1][name], grad, FP32_TOLERANCE, name)
    with torch.no_grad():
        model.eval()
        with gated_implementation(model, "reference"):
            expected = model(pixels).gates
        with gated_implementation(model, "auto"):
            actual = model(pixels).gates
    assert all(torch.equal(a, b) for a, b in zip(expected, actual, strict=True))


def implementations(model) -> set[str]:
    return {m.implementation for m in model.modules() if isinstance(m, GatedLayer | GateController)}


def test_implementation_is_per_model_in_its_config_validated_and_restored(tmp_path):
    model, other = perturbed_model("resnet", torch.float32), perturbed_model("resnet", torch.float32)
    with pytest.raises(ValueError, match="implementation must be one of"):
        with gated_implementation(model, "fastest"):
            pass
    with gated_implementation(model, "reference"):
        assert implementations(model) == {"reference"} and implementations(other) == {"auto"}
    assert implementations(model) == {"auto"}
    model.set_gated_implementation(
        "merged"
    )  # like set_attn_implementation: this model only, recorded in its config
    assert model.config.gated_implementation == "merged" and implementations(other) == {"auto"}
    assert {m.implementation for m in model.modules() if isinstance(m, GatedLayer)} == {"merged"}
    model.save_pretrained(tmp_path)
    reloaded = AdaFilterForImageClassification.from_pretrained(tmp_path)
    assert {m.implementation for m in reloaded.modules() if isinstance(m, GatedLayer)} == {"merged"}
    built = AdaFilterForImageClassification.from_backbone(random_backbone("resnet"), num_labels=2,
                                                          gated_implementation="reference")  # fmt: skip
    assert implementations(built) == {"reference"}
    with pytest.raises(ValueError, match="gated_implementation must be one of"):
        AdaFilterConfig(gated_implementation="fastest")


# ----------------------------------------------------------------------------- autocast and torch.compile


def decisive_gates(model: AdaFilterForImageClassification) -> AdaFilterForImageClassification:
    """Mixed but clear-cut gate decisions (log-odds +-4), so half-precision rounding cannot flip them."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for head in model.adafilter.gate_controller.heads:
            head.weight.mul_(0.01)
            signs = torch.randint(0, 2, head.bias.shape, generator=generator).float() * 2 - 1
            head.bias.copy_(4 * signs)
    return model


def autocast_run(model, implementation: str, pixels: torch.Tensor, dtype: torch.dtype | None, train: bool):
    model = copy.deepcopy(model).train(train)
    model.adafilter.gate_controller.eval()  # deterministic decisions: no noise to amplify rounding differences
    with (
        gated_implementation(model, implementation),
        torch.autocast(pixels.device.type, dtype=dtype or torch.bfloat16, enabled=bool(dtype)),
    ):
        with torch.set_grad_enabled(train):
            out = model(pixels, labels=LABELS if train else None)
    grads = {}
    if train:
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def relative_error(actual: dict, expected: dict) -> float:
    scale = max(t.abs().max().item() for t in expected.values())
    return max((actual[k].float() - t).abs().max().item() for k, t in expected.items()) / scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "family, train", [("resnet", True), ("regnet", True), ("convnext", True), ("efficientnet", False)]
)
def test_autocast_fast_paths_are_as_accurate_as_the_reference(family, train, dtype):
    """Under autocast both paths round differently, so each is compared with the float32 result: the fast path
    may not be less accurate than the reference (batch-4 BatchNorm of the tiny EfficientNet is too ill-conditioned
    in half precision for a training comparison, so it is checked in inference)."""
    model = decisive_gates(perturbed_model(family, torch.float32))
    pixels = pixel_batch()
    exact, exact_grads = autocast_run(model, "reference", pixels, None, train)
    errors = {}
    for implementation in ("reference", "auto"):
        out, grads = autocast_run(model, implementation, pixels, dtype, train)
        assert out.logits.dtype == exact.logits.dtype or out.logits.dtype == dtype
        assert all(torch.equal(a.float(), b) for a, b in zip(out.gates, exact.gates, strict=True))
        errors[implementation] = relative_error({"logits": out.logits}, {"logits": exact.logits})
        if train:
            assert grads.keys() == exact_grads.keys()
            errors[implementation + " grads"] = relative_error(grads, exact_grads)
    for key in [k for k in errors if k.startswith("auto")]:
        reference_key = key.replace("auto", "reference")
        assert errors[key] <= max(2 * errors[reference_key], 1e-3), errors


def test_torch_compile_traces_the_fast_paths():
    model = perturbed_model("resnet", torch.float32)
    pixels = pixel_batch()
    reference_model = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    reference = run_step(reference_model, "reference", pixels, True)
    fast = run_step(compiled, "auto", pixels, True)
    compare_runs(reference, fast, reference_model, model, FP32_TOLERANCE, grad_scale="model")
    model.eval()
    reference_model.eval()
    with torch.no_grad():
        with gated_implementation(reference_model, "reference"):
            expected = reference_model(pixels).logits
        assert_close(compiled(pixels).logits, expected, FP32_TOLERANCE, "compiled eval")
        # Inference traces into one graph: folded, merged and two-bank paths included.
        explanation = torch._dynamo.explain(model.adafilter)(pixels)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ----------------------------------------------------------------------------- the benchmark script


def load_speed_module():
    return load_script(ROOT / "benchmarks" / "speed.py", "speed_benchmark")


def test_speed_benchmark_runs_on_a_tiny_config():
    speed = load_speed_module()
    settings = speed.Settings(threads=torch.get_num_threads(), warmup=1, train_repeats=1, infer_repeats=1)
    result = speed.benchmark_config(speed.CONFIGS["tiny-resnet"], settings, measure_memory=False)
    result.memory = {
        variant: speed.memory_probe(speed.CONFIGS["tiny-resnet"], variant, settings)
        for variant in speed.VARIANTS
    }
    assert set(result.seconds) == {"train_step", "infer_b1", "infer_b4"}
    assert set(result.seconds["train_step"]) == set(speed.VARIANTS)
    for metric in ("infer_b1", "infer_b4"):
        assert set(result.seconds[metric]) == {*speed.VARIANTS, speed.VERSION_CHECK}
    report = speed.render([result], settings, "python benchmarks/speed.py --quick", ("0", "0"))
    assert "| tiny-resnet | 32 | fp32 | training step, batch 4 |" in report
    assert '| tiny-resnet | 32 | fp32 | inference, batch 1, `folded_weights_check="version"` |' in report
    assert "training peak RSS" in report and "torch " + torch.__version__ in report


def test_each_implementation_name_is_its_own_function_looked_up_once():
    from hf_adafilter.modeling.configuration_adafilter import GATED_IMPLEMENTATIONS
    from hf_adafilter.modeling.layers import GATED_FORWARDS

    assert tuple(GATED_FORWARDS) == GATED_IMPLEMENTATIONS
    assert len({id(forward) for forward in GATED_FORWARDS.values()}) == len(GATED_FORWARDS)
    layer = next(iter(perturbed_model("resnet").adafilter.gated_layers.values()))
    layer.implementation = "merged"
    assert layer._gated_forward is GATED_FORWARDS["merged"]
    with pytest.raises(ValueError, match="implementation must be one of"):
        layer.implementation = "fast"
    assert layer.implementation == "merged"


def agreement_patterns(batch: int, filters: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    column = torch.randint(0, 2, (filters,), generator=generator).double()
    alternating = (torch.arange(batch)[:, None] + torch.arange(filters)[None, :]) % 2
    mix = column.expand(batch, filters).clone()
    mix[0, ::3] = 1 - mix[0, ::3]  # a third of the filters disagree
    return {"all agree": column.expand(batch, filters), "none agree": alternating.double(), "mix": mix}


def test_agreement_split_equals_both_banks_and_a_select(family):
    """Per gated layer of every family: the split gives what both banks and a select give, for batches where every
    filter agrees, none does, and a mix."""
    from hf_adafilter.modeling.gated_inference import agreement_split_forward, two_bank_forward

    model = perturbed_model(family).eval()
    checked = 0
    for layer in model.adafilter.gated_layers.values():
        op = layer._bank_op()
        if op is None or op.groups != 1:
            continue
        with torch.no_grad(), gate_forward(model.adafilter.gate_controller):
            folded = layer._current_folded(op)
        shape = (3, layer.in_channels, 6, 6) if not op.linear else (3, 5, 5, layer.in_channels)
        pixels = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        pixels = op.prepare(layer.base_layer, pixels)
        for name, gates in agreement_patterns(3, layer.out_channels).items():
            gates = gates.to(DEVICE)
            split = agreement_split_forward(op, pixels, gates, folded)
            expected = two_bank_forward(op, pixels, gates, folded)
            assert_close(split, expected, FP64_TOLERANCE, f"{family} {name}")
        checked += 1
    assert checked


def test_auto_inference_splits_a_batch_that_agrees_and_matches_the_reference(family):
    model = perturbed_model(family).eval()
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for head in model.adafilter.gate_controller.heads:  # every example decides alike: the split runs
            head.weight.zero_()
            head.bias.copy_(torch.randint(0, 2, head.bias.shape, generator=generator).double() * 8 - 4)
    pixels = pixel_batch().double()
    with torch.no_grad():
        with gated_implementation(model, "reference"):
            reference = model(pixels)
        fast = model(pixels)
    assert_close(fast.logits, reference.logits, FP64_TOLERANCE, "logits")
    assert all(torch.equal(a, b) for a, b in zip(reference.gates, fast.gates, strict=True))


def test_speed_benchmark_times_a_trained_model_on_real_images(tmp_path):
    speed = load_speed_module()
    model = perturbed_model("resnet", torch.float32)
    model.save_pretrained(tmp_path)
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    settings = speed.Settings(threads=torch.get_num_threads(), warmup=1, train_repeats=1, infer_repeats=1)
    lines = speed.trained_gates_section([tmp_path], settings)
    name = f"{tmp_path.name} (resnet, 32 px)"
    assert any(line.startswith(f"{name}: calibration agreement") and "learned gates" in line for line in lines)
    rows = [line for line in lines if line.startswith(f"| {name} |")]
    assert [row.split(" | ")[1] for row in rows] == ["1", "32"]
    assert all(row.count("**") == 6 and "<= 1.05x" in row for row in rows)
    assert lines[-1].startswith(f"{name}, batch 1, where the time goes: the gate network alone")


def test_speed_benchmark_saves_a_backbone_the_training_script_can_wrap(tmp_path):
    """`--save_backbone` writes what `examples/run.py --model_name_or_path` needs: the benchmarked plain classifier
    (same weights) and an image processor."""
    speed = load_speed_module()
    speed.main(["--save_backbone", "tiny-resnet", str(tmp_path)])
    saved = transformers.AutoModelForImageClassification.from_pretrained(tmp_path)
    built = speed.CONFIGS["tiny-resnet"].build()
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), built.state_dict().values(), strict=True))
    assert transformers.AutoImageProcessor.from_pretrained(tmp_path) is not None
    model = AdaFilterForImageClassification.from_backbone(str(tmp_path), num_labels=3)
    assert model.gated_layer_names
