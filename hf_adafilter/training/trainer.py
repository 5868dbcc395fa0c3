"""AdaFilterTrainer: a `transformers.Trainer` that regularises, anneals and reports the gates.

It trains plain transformers classifiers too (the fine-tuning and linear-probe baselines), so every method runs
through the same loop.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..metrics.gate_statistics import filter_weighted_mean
from ..modeling.modeling_adafilter import AdaFilterModel, AdaFilterPreTrainedModel
from .arguments import AdaFilterArguments
from .hub_outputs import HubOutputsMixin
from .regularization import gate_regularization

logger = logging.getLogger(__name__)


def _adafilter(model: nn.Module | None) -> AdaFilterModel | None:
    """The gated AdaFilterModel under any wrapper (DDP, accelerate, compile, a head), or None for a plain model."""
    while model is not None and not isinstance(model, AdaFilterPreTrainedModel):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return getattr(model, "adafilter", model)


def schedule_progress(step: int, max_steps: int) -> float:
    """0 at the first step, 1 at the last (and after): where a gate schedule stands."""
    return min(step / max(max_steps - 1, 1), 1.0)


def gumbel_temperature_at(step: int, max_steps: int, start: float, end: float) -> float:
    """Geometric interpolation: equal ratios per step, so the late, low-temperature phase is not rushed."""
    return start * (end / start) ** schedule_progress(step, max_steps)


def gate_noise_at(step: int, max_steps: int, start: float, end: float) -> float:
    """Linear interpolation: the noise scale can reach exactly 0."""
    return start + (end - start) * schedule_progress(step, max_steps)


class GateScheduleCallback(TrainerCallback):
    """Anneals the Gumbel-softmax temperature (geometric, shapes the gradient) and the scale of the decision noise
    (linear, decides how often training decisions differ from the evaluation ones) over the run."""

    def __init__(self, adafilter_args: AdaFilterArguments) -> None:
        self.args = adafilter_args
        self._outside_warmup: list[float | None] = []  # the forced value the warm-up replaced, while it runs

    def _warm_up(self, controller, warming: bool) -> None:
        """Every gate on F while `warming`; afterwards the forced value from before (a user's `forced_gates`)."""
        if warming and not self._outside_warmup:
            self._outside_warmup.append(controller.forced_value)
            controller.forced_value = 1.0
        elif not warming and self._outside_warmup:
            controller.forced_value = self._outside_warmup.pop()

    def _set(self, model: nn.Module | None, step: int, max_steps: int) -> None:
        adafilter = _adafilter(model)
        if adafilter is not None:
            a = self.args
            # Warm-up (`gate_warmup_ratio`): plain fine-tuning of the fine-tuned bank, every gate on it; the gate
            # schedules then run over the remaining steps.
            warmup = round(a.gate_warmup_ratio * max_steps)
            self._warm_up(adafilter.gate_controller, step < warmup)
            step, max_steps = max(step - warmup, 0), max_steps - warmup
            adafilter.set_gumbel_temperature(
                gumbel_temperature_at(step, max_steps, a.gumbel_temperature_start, a.gumbel_temperature_end)
            )
            adafilter.gate_controller.noise_scale = gate_noise_at(
                step, max_steps, a.gate_noise_start, a.gate_noise_end
            )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # The gate noise gets its own RNG, seeded per run (and rank): the global stream that augmentation and dropout
        # draw from then does not depend on the method, so a fine-tuning run and an AdaFilter run with the same seed
        # see the same crops in the same order (a paired comparison).
        adafilter = _adafilter(model)
        if adafilter is not None:
            generator = torch.Generator(device=adafilter.device)
            adafilter.gate_controller.noise_generator = generator.manual_seed(args.seed + args.process_index)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._set(model, state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._set(model, state.max_steps, state.max_steps)


def gate_diagnostics(
    gates: tuple[torch.Tensor, ...], probs: tuple[torch.Tensor, ...] | None = None
) -> dict[str, torch.Tensor]:
    """Per-layer statistics of one batch's decisions, each a (layers,) tensor:

    - `finetuned_fraction`: share of (example, filter) decisions that use the fine-tuned bank;
    - `example_dependent`: share of filters whose decision differs between examples of the batch (the decision
      the model would take in evaluation, so noise does not count);
    - with the training-time `probs` (sigmoid of the log-odds): `train_eval_agreement`, the share of sampled
      decisions equal to the evaluation decision (`log_odds > 0`), and `mean_abs_log_odds`.
    """
    decisions = [g.detach().float() for g in gates]
    eval_decisions = decisions if probs is None else [(p.detach() > 0.5).float() for p in probs]
    stats = {
        "finetuned_fraction": torch.stack([d.mean() for d in decisions]),
        "example_dependent": torch.stack([(d.amax(0) != d.amin(0)).float().mean() for d in eval_decisions]),
    }
    if probs is not None:
        stats["train_eval_agreement"] = torch.stack(
            [(d == e).float().mean() for d, e in zip(decisions, eval_decisions, strict=True)]
        )
        stats["mean_abs_log_odds"] = torch.stack(
            [torch.logit(p.detach().float(), eps=1e-6).abs().mean() for p in probs]
        )
    return stats


class GateStatistics:
    """Running per-layer gate diagnostics (`gate_diagnostics`), kept on the device so logging costs no sync per
    step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0

    def update(self, gates: tuple[torch.Tensor, ...], probs: tuple[torch.Tensor, ...] | None = None) -> None:
        with torch.no_grad():
            for key, value in gate_diagnostics(gates, probs).items():
                self.sums[key] = value if key not in self.sums else self.sums[key] + value
        self.batches += 1

    def pop(self) -> dict[str, torch.Tensor]:
        """Mean per-layer statistics since the last pop (empty if no batch was seen)."""
        means = {key: value / self.batches for key, value in self.sums.items()}
        self.sums, self.batches = {}, 0
        return means


class AdaFilterTrainer(HubOutputsMixin, Trainer):
    """Cross-entropy plus `gate_regularization_weight * R(gates)`, a separate gate learning rate, Gumbel annealing,
    and the fine-tuned fraction (overall, per stage) in the logs. The model arrives ready to train (what it trains
    trainable, its norms' momentum set where it was built): the Trainer changes nothing of it but its weights.
    """

    # The loss is a per-batch mean: the Trainer must divide it by the accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        adafilter_args: AdaFilterArguments | None = None,
        weight_penalty: Callable[[], torch.Tensor] | None = None,
        **kwargs,
    ) -> None:
        """`weight_penalty`: a loss term on the weights added every training step (e.g. `l2sp.L2SPPenalty`); its
        `parameters()` get no weight decay, which it replaces."""
        self.adafilter_args = adafilter_args or AdaFilterArguments()
        self.weight_penalty = weight_penalty
        super().__init__(*args, **kwargs)
        self._gate_stats = {"train": GateStatistics(), "eval": GateStatistics()}
        self.last_eval_gate_fractions: dict[str, float] = {}
        if _adafilter(self.model) is not None:
            self.add_callback(GateScheduleCallback(self.adafilter_args))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        gates = outputs.get("gates") if isinstance(outputs, dict) else None
        if gates:
            args = self.adafilter_args
            if model.training and args.gate_regularization != "none" and args.gate_regularization_weight > 0:
                penalty = gate_regularization(gates, args.gate_regularization, args.gate_target_ratio)
                loss = loss + args.gate_regularization_weight * penalty
            probs = outputs.get("gate_probs") if model.training else None
            self._gate_stats["train" if model.training else "eval"].update(gates, probs)
        if self.weight_penalty is not None and model.training:
            loss = loss + self.weight_penalty()
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (its `--optim` choices, optimizer factories, 8-bit optimizers, `optimizers=`),
        with its parameter groups split once more: the gate network at its own learning rate, no weight decay on what
        the weight penalty covers. An optimizer the user passed, or one built over something else than this model's
        trainable parameters (GaLore, layer-wise), is left as it is."""
        opt_model = self.model if model is None else model
        adafilter = _adafilter(opt_model)
        gate_lr = self.adafilter_args.gate_learning_rate if adafilter is not None else None
        given = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        if given or (gate_lr is None and self.weight_penalty is None):
            return optimizer
        trainable = [p for p in opt_model.parameters() if p.requires_grad]
        grouped = [p for group in optimizer.param_groups for p in group["params"]]
        if not isinstance(optimizer, torch.optim.Optimizer) or {id(p) for p in grouped} != {id(p) for p in trainable}:
            logger.warning(
                f"{type(optimizer).__name__} does not optimise this model's parameters in plain groups: the gate "
                "learning rate and the weight penalty's decay exemption are not applied to it."
            )
            return optimizer
        optimizer.param_groups.clear()
        for group in self._parameter_groups(opt_model, adafilter, gate_lr):
            optimizer.add_param_group(group)
        return optimizer

    def _parameter_groups(self, model: nn.Module, adafilter: AdaFilterModel | None, gate_lr: float | None) -> list:
        gate_ids = {id(p) for p in adafilter.gate_parameters()} if gate_lr is not None else set()
        penalised = (
            {id(p) for p in self.weight_penalty.parameters()} if self.weight_penalty is not None else set()
        )
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = defaultdict(list)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                decays = name in decay and id(parameter) not in penalised
                groups[(id(parameter) in gate_ids, decays)].append(parameter)
        return [
            {
                "params": params,
                "weight_decay": self.args.weight_decay if decays else 0.0,
                **({"lr": gate_lr} if is_gate else {}),
            }
            for (is_gate, decays), params in groups.items()
        ]

    def _gate_logs(self, split: str, prefix: str = "") -> dict[str, float]:
        stats = self._gate_stats[split].pop()
        adafilter = _adafilter(self.model)
        if not stats or adafilter is None:
            return {}
        stats = {key: self.accelerator.reduce(value, reduction="mean") for key, value in stats.items()}
        per_layer = stats["finetuned_fraction"].tolist()
        names, stages = adafilter.gated_layer_names, adafilter.gated_layer_stages
        widths = [layer.out_channels for layer in adafilter.gated_layers.values()]
        if prefix == "eval_":  # the validation split with learned gates, for the model card and plot
            self.last_eval_gate_fractions = dict(zip(names, per_layer, strict=True))
        logs = {
            f"{prefix}gates/{key}": filter_weighted_mean(value.tolist(), widths)
            for key, value in stats.items()
        }
        by_stage: dict[str, list[int]] = defaultdict(list)
        for index, stage in enumerate(stages):
            by_stage[stage].append(index)
        for stage, indices in by_stage.items():
            logs[f"{prefix}gates/{stage}"] = filter_weighted_mean(
                [per_layer[i] for i in indices], [widths[i] for i in indices]
            )
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the gates seen since the last one
            logs.update(self._gate_logs("train"))
            adafilter = _adafilter(self.model)
            if adafilter is not None:
                logs["gates/temperature"] = adafilter.gate_controller.temperature
                logs["gates/noise_scale"] = adafilter.gate_controller.noise_scale
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        output.metrics.update(self._gate_logs("eval", prefix=f"{metric_key_prefix}_"))
        return output

    def evaluate_static_export(
        self, eval_dataset, calibration_dataset, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Accuracy (and loss) of the model's static export as `{prefix}_static_*`, and the share of calibration
        decisions its fixed choices reproduce, `static_agreement`; empty without gates. The export is made from
        `calibration_dataset` at the first call and reused, so validation and test score the same model."""
        model = self.accelerator.unwrap_model(self.model)
        if _adafilter(model) is None or not hasattr(model, "export_static"):
            return {}
        if getattr(self, "_static_evaluator", None) is None:
            loader = self.get_eval_dataloader(calibration_dataset)
            device = next(model.parameters()).device
            static = model.export_static(batch["pixel_values"].to(device) for batch in loader)
            self._static_evaluator = Trainer(model=static, args=self.args, data_collator=self.data_collator,
                                             compute_metrics=self.compute_metrics)  # fmt: skip
        evaluator = self._static_evaluator
        output = evaluator.predict(eval_dataset, metric_key_prefix=f"{metric_key_prefix}_static")
        metrics = {k: v for k, v in output.metrics.items() if "_per_second" not in k and "runtime" not in k}
        return metrics | {"static_agreement": evaluator.model.config.adafilter_static["agreement"]}

    def evaluate_forced_gates(self, eval_dataset, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Accuracy (and loss) with every gate forced to the fine-tuned bank and to the pre-trained bank: the learned
        gates are worth their cost only if they beat both. `{prefix}_forced_finetuned_*` / `_forced_pretrained_*`;
        empty for models without gates."""
        adafilter = _adafilter(self.model)
        if adafilter is None:
            return {}
        metrics = {}
        for value, name in ((1.0, "forced_finetuned"), (0.0, "forced_pretrained")):
            with adafilter.forced_gates(value):
                output = self.predict(eval_dataset, metric_key_prefix=f"{metric_key_prefix}_{name}")
            metrics.update(
                {k: v for k, v in output.metrics.items() if "gates/" not in k and "_per_second" not in k}
            )
        return metrics
