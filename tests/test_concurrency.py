"""One model, however it is called: from threads at once, as DataParallel replicas, pickled, in another dtype."""

from __future__ import annotations

import io
import pickle
import threading

import pytest
import torch
from conftest import perturb_finetuned_bank, pixel_batch, random_backbone

from hf_adafilter import AdaFilterForImageClassification


def trained_looking_model(family: str = "resnet", dtype: torch.dtype = torch.float64):
    """Banks that differ and gate heads that depend on the input, so mixed-up gate state would show."""
    model = AdaFilterForImageClassification.from_backbone(random_backbone(family), num_labels=3)
    perturb_finetuned_bank(model, seed=3, scale=0.3, mean_shift=0.2, gain=1.3, bias_shift=0.1)
    with torch.no_grad():
        for head in model.adafilter.gate_controller.heads:
            head.weight.normal_(0, 2.0)
    return model.to(dtype).eval()


def in_threads(function, inputs: list) -> list:
    """`function` on every input at once, one thread each (as `parallel_apply` runs replicas); re-raises."""
    results, errors = [None] * len(inputs), []

    def work(index: int) -> None:
        try:
            results[index] = function(index, inputs[index])
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def cpu_replicate(model: torch.nn.Module, copies: int) -> list[torch.nn.Module]:
    """What `torch.nn.parallel.replicate` does, on the CPU: every module `_replicate_for_data_parallel()`, its
    parameters replaced by non-leaf copies that pass gradients back (broadcast's), buffers copied."""
    modules = list(model.modules())
    index = {id(module): i for i, module in enumerate(modules)}
    replicas = [[module._replicate_for_data_parallel() for module in modules] for _ in range(copies)]
    parameters = {id(p): [p.clone() for _ in range(copies)] for p in model.parameters()}
    for i, module in enumerate(modules):
        for j in range(copies):
            replica = replicas[j][i]
            for key, child in module._modules.items():
                if child is None:
                    replica._modules[key] = None
                else:
                    setattr(replica, key, replicas[j][index[id(child)]])
            for key, parameter in module._parameters.items():
                if parameter is None:
                    replica._parameters[key] = None
                else:
                    setattr(replica, key, parameters[id(parameter)][j])
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    setattr(replica, key, buffer.clone())
    return [replica[0] for replica in replicas]


def assert_same_outputs(outputs: list, expected) -> None:
    for output in outputs:
        torch.testing.assert_close(output.logits, expected.logits, rtol=1e-5, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(output.gates, expected.gates, strict=True))


def test_two_threads_on_one_model_get_the_sequential_answers():
    model = trained_looking_model(dtype=torch.float32)
    batches = [pixel_batch(8, seed=1), pixel_batch(5, seed=2)]
    with torch.no_grad():
        expected = [model(batch) for batch in batches]

        def call_repeatedly(index: int, batch: torch.Tensor) -> list:
            return [model(batch) for _ in range(15)]

        for index, outputs in enumerate(in_threads(call_repeatedly, batches)):
            assert_same_outputs(outputs, expected[index])


def test_a_compiled_model_from_two_threads_gets_the_sequential_answers():
    """Compiled forwards keep their gate state per thread too: the same thread-local as eager ones."""
    model = trained_looking_model(dtype=torch.float32)
    batches = [pixel_batch(6, seed=1), pixel_batch(6, seed=2)]  # one shape: one compiled graph
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            expected = [model(batch) for batch in batches]
            compiled(batches[0])  # compiled before the threads race

            def call_repeatedly(index: int, batch: torch.Tensor) -> list:
                return [compiled(batch) for _ in range(10)]

            for index, outputs in enumerate(in_threads(call_repeatedly, batches)):
                assert_same_outputs(outputs, expected[index])
    finally:
        torch._dynamo.reset()  # later compiles start from scratch


def test_data_parallel_replicas_match_sequential_calls_in_outputs_gates_and_gradients():
    """In training (batch statistics, straight-through gates; no noise, so both runs decide alike), each replica on
    its chunk computes what the model computes on that chunk, and the gradients reach the model's parameters."""
    model = trained_looking_model().train()
    model.adafilter.gate_controller.noise_scale = 0.0
    chunks = list(pixel_batch(6, seed=4).double().chunk(2))

    def loss_of(outputs) -> torch.Tensor:
        return sum(output.logits.pow(2).sum() + sum(g.sum() for g in output.gates) for output in outputs)

    model.zero_grad()
    expected = [model(chunk) for chunk in chunks]
    loss_of(expected).backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert any("gate_controller" in name for name in expected_grads)

    model.zero_grad()
    replicas = cpu_replicate(model, 2)
    outputs = in_threads(lambda index, chunk: replicas[index](chunk), chunks)
    loss_of(outputs).backward()
    for output, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output.logits, reference.logits, rtol=1e-9, atol=1e-9)
        assert all(torch.equal(a, b) for a, b in zip(output.gates, reference.gates, strict=True))
    for name, grad in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-7, atol=1e-9)


def test_a_replica_uses_its_own_parameters():
    model = trained_looking_model()
    replica = cpu_replicate(model, 1)[0]
    pixels = pixel_batch(2).double()
    with torch.no_grad():
        before = replica(pixels).logits
        for module in replica.modules():  # what a replica on another device holds: its own copies
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and value.is_floating_point() and "finetuned" in str(module):
                    setattr(module, name, value * 0)
        replica.adafilter.gate_controller.heads[0].bias = replica.adafilter.gate_controller.heads[0].bias + 50.0
        after = replica(pixels).logits
        original = model(pixels).logits
    torch.testing.assert_close(original, before)
    assert not torch.allclose(after, before)  # the replica's own (edited) copies decided, not the original's


@pytest.mark.parametrize("edit", ["finetuned weight", "pretrained weight", "running mean", "one element"])
def test_in_place_edits_through_data_are_seen_by_every_implementation(edit):
    """Weight averaging, pruning and quantisation tools edit through `.data`, which no version counter records:
    the cached folded banks of the inference paths must still follow, as the reference does."""
    model = trained_looking_model(dtype=torch.float32)
    pixels = pixel_batch(1), pixel_batch(4, seed=5)
    layer = next(iter(model.adafilter.gated_layers.values()))
    tensor = {
        "finetuned weight": layer.finetuned_layer.weight,
        "pretrained weight": layer.base_layer.weight,
        "running mean": layer.base_norm.running_mean,
        "one element": layer.finetuned_layer.weight,
    }[edit]
    with torch.no_grad():
        for implementation in ("auto", "merged", "fused"):
            model.set_gated_implementation(implementation)
            before = [model(batch).logits for batch in pixels]
            if edit == "one element":  # in both banks, so that it shows whichever bank the gate picks
                for bank in (layer.finetuned_layer, layer.base_layer):
                    bank.weight.data.view(-1)[7] += 0.5
            else:
                tensor.data.mul_(1.5).add_(0.1)
            after = [model(batch).logits for batch in pixels]
            model.set_gated_implementation("reference")
            reference = [model(batch).logits for batch in pixels]
            for moved, unmoved, expected in zip(after, before, reference, strict=True):
                assert not torch.equal(moved, unmoved)
                torch.testing.assert_close(moved, expected, rtol=1e-5, atol=1e-5)


def test_folded_weights_check_version_trusts_the_version_counters():
    """The serving option: no checksum read per call, so an edit through `.data` goes unseen until a tracked edit."""
    model = trained_looking_model(dtype=torch.float32)
    model.config.folded_weights_check = "version"
    pixels = pixel_batch(2)
    weight = next(iter(model.adafilter.gated_layers.values())).finetuned_layer.weight
    with torch.no_grad():
        before = model(pixels).logits
        weight.data.mul_(1.5)
        torch.testing.assert_close(model(pixels).logits, before, rtol=0, atol=0)
        weight.mul_(1.0)  # tracked: bumps the version
        assert not torch.equal(model(pixels).logits, before)


def test_pickle_and_torch_save_round_trip_the_model():
    model = trained_looking_model(dtype=torch.float32)
    pixels = pixel_batch(3)
    with torch.no_grad():
        expected = model(pixels).logits
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for restored in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
            torch.testing.assert_close(restored(pixels).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_float32_pixels_are_cast_to_the_models_dtype(dtype):
    model = trained_looking_model(dtype=dtype)
    pixels = pixel_batch(2)
    with torch.no_grad():
        logits = model(pixels).logits
        torch.testing.assert_close(logits, model(pixels.to(dtype)).logits, rtol=0, atol=0)
    assert logits.dtype == dtype
    with pytest.raises(ValueError, match="image processor"):
        model(pixels.to(torch.uint8))


def test_a_gated_layer_called_outside_its_model_says_how_to_call_it():
    model = trained_looking_model()
    layer = next(iter(model.adafilter.gated_layers.values()))
    with pytest.raises(RuntimeError, match="call the model, not the layer"):
        layer(torch.randn(1, layer.in_channels, 8, 8, dtype=torch.float64))
