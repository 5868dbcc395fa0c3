"""AdaFilter models: a transformers vision backbone whose selected layers are gated filter layers.

Travels to the Hub as remote code: relative imports only, nothing beyond torch, transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init

from .backbones import BackboneFamily, find_gate_targets, get_family, weight_standardization_eps
from .bank_export import plain_classifier_of_bank, static_classifier
from .checkpointing import AdaFilterCheckpointMixin
from .configuration_adafilter import AdaFilterConfig, check_known_keys
from .from_backbone import wrap_backbone
from .gating import GateController, activate_gate_forward, deactivate_gate_forward
from .inputs import check_labels, check_pixel_values
from .layers import GatedLayer, apply_gated_implementation
from .outputs import AdaFilterImageClassifierOutput, AdaFilterModelOutput

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "LayerNorm" in type(module).__name__


class AdaFilterPreTrainedModel(AdaFilterCheckpointMixin, PreTrainedModel):
    config: AdaFilterConfig
    config_class = AdaFilterConfig
    base_model_prefix = "adafilter"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # The loss is a plain mean over the batch: let the Trainer scale it for gradient accumulation.
    accepts_loss_kwargs = False
    # Per gated layer (`GatedLayer.gradient_checkpointing`): the banks are recomputed, the gates are not.
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LSTMCell, nn.GRUCell)):
            bound = module.hidden_size**-0.5
            for parameter in module.parameters():
                init.uniform_(parameter, -bound, bound)

    def initialize_weights(self) -> None:
        """The backbone's own init also runs over both banks; re-copy the pre-trained bank so they start equal.
        Gate heads start at the configured prior log-odds (loaded tensors are skipped)."""
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, AdaFilterModel):
                module.sync_finetuned_bank()
                for head in module.gate_controller.heads:
                    init.constant_(head.bias, self.config.gate_init_log_odds)

    def frozen_parameter_names(self) -> dict[str, str]:
        """The trainability rule (written in `AdaFilterModel.frozen_parameter_names`): state-dict key -> plain-backbone
        name of every frozen parameter, by structure, not `requires_grad`. What `freeze_pretrained_bank` freezes and
        a compact checkpoint leaves out and checksums."""
        prefix = f"{self.base_model_prefix}."
        return {prefix + key: name for key, name in self.base_model.frozen_parameter_names().items()}

    def _set_gradient_checkpointing(self, *args, **kwargs) -> None:
        """transformers' `activation_checkpointing_enable`, for the gated layers only: they recompute their banks
        in backward, not their gates; a backbone block recomputed whole would step the gate network again,
        outside the forward."""
        super()._set_gradient_checkpointing(*args, **kwargs)
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing") and not isinstance(module, GatedLayer):
                module.gradient_checkpointing = False

    def freeze_pretrained_bank(self) -> None:
        """Applies the rule: frozen exactly `frozen_parameter_names()`; the fine-tuned bank, norms, gate network and
        head train. Called where a model is built or loaded (transformers recreates parameters on load)."""
        frozen = self.frozen_parameter_names()
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name not in frozen)


class AdaFilterModel(AdaFilterPreTrainedModel):
    def __init__(self, config: AdaFilterConfig, **kwargs) -> None:
        # Keyword arguments of `from_pretrained` that are not config fields arrive here: name the closest field.
        check_known_keys(kwargs)
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.backbone_config)
        self.family.prepare(self.backbone)
        targets = find_gate_targets(self.backbone, self.family, config.target_modules, config.exclude_modules)
        self.gate_controller = GateController(
            in_channels=[_channels(t.module)[0] for t in targets],
            out_channels=[_channels(t.module)[1] for t in targets],
            network=config.gate_network,
            input_size=config.gate_input_size,
            hidden_size=config.gate_hidden_size,
            temperature=config.gumbel_temperature,
        )
        self._gated: dict[str, GatedLayer] = {}
        # Backbone key of each bank's source tensors, for loading plain backbone checkpoints into both banks.
        self._source_modules: dict[str, str] = {}
        for index, target in enumerate(targets):
            norm = getattr(target.parent, target.norm_name) if target.norm_name else None
            layer = GatedLayer(
                target.module,
                norm,
                gated_norm=config.gated_norm,
                weight_standardization_eps=weight_standardization_eps(target.module),
            )
            layer.layer_index = index
            setattr(target.parent, target.attribute, layer)
            self._source_modules[f"{target.name}.base_layer"] = target.name
            self._source_modules[f"{target.name}.finetuned_layer"] = target.name
            if target.norm_name:
                # The layer owns the norm now; the parent's slot becomes a no-op.
                setattr(target.parent, target.norm_name, nn.Identity())
                norm_source = f"{target.name.rpartition('.')[0]}.{target.norm_name}".lstrip(".")
                self._source_modules[f"{target.name}.base_norm"] = norm_source
                if layer.finetuned_norm is not None:
                    self._source_modules[f"{target.name}.finetuned_norm"] = norm_source
            self._gated[target.name] = layer
        self.num_features = self.family.feature_size(self.backbone)
        self.post_init()
        self.freeze_pretrained_bank()
        apply_gated_implementation(self, config.gated_implementation)

    def set_gated_implementation(self, name: str) -> None:
        """How this model's gated layers compute from now on (`config.gated_implementation`), like transformers'
        `set_attn_implementation`; other models are not affected."""
        apply_gated_implementation(self, name)
        self.config.gated_implementation = name

    @property
    def family(self) -> BackboneFamily:
        """The backbone family's rules, looked up (not stored: they hold functions, which would stop pickling)."""
        return get_family(self.config.backbone_config.model_type)

    @property
    def gated_layer_names(self) -> list[str]:
        return list(self._gated)

    @property
    def gated_layers(self) -> dict[str, GatedLayer]:
        return dict(self._gated)

    @property
    def gated_layer_stages(self) -> list[str]:
        """Stage of each gated layer ("stage1", ..., "head"), in `gated_layer_names` order."""
        return [self.family.stage_of(name, self.config.backbone_config) for name in self._gated]

    def set_gumbel_temperature(self, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"Gumbel temperature must be > 0, got {temperature!r}.")
        self.gate_controller.temperature = float(temperature)

    @contextlib.contextmanager
    def forced_gates(self, value: float | None) -> Iterator[None]:
        """Every gate set to `value` (0.0: pre-trained bank only, 1.0: fine-tuned bank only) inside the block."""
        previous, self.gate_controller.forced_value = self.gate_controller.forced_value, value
        try:
            yield
        finally:
            self.gate_controller.forced_value = previous

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        return self.gate_controller.parameters()

    def frozen_parameter_names(self) -> dict[str, str]:
        """The trainability rule, written once: frozen are the parameters of non-norm backbone modules outside the
        fine-tuned banks (the pre-trained bank, ungated filters); the fine-tuned bank, every norm, the gate network
        (and a wrapping classifier's head) train. Keys as in this model's state dict -> plain-backbone names."""
        finetuned = tuple(f"{name}.finetuned_layer." for name in self._gated)
        frozen = {}
        for module_name, module in self.backbone.named_modules():
            if isinstance(module, GatedLayer) or _is_norm(module):
                continue
            for tensor_name, _ in module.named_parameters(recurse=False):
                key = f"{module_name}.{tensor_name}" if module_name else tensor_name
                if not key.startswith(finetuned):
                    frozen[f"backbone.{key}"] = self.backbone_key(key)
        return frozen

    @torch.no_grad()
    def sync_finetuned_bank(self) -> None:
        """Copies the pre-trained bank (and its norm) into the fine-tuned one; skips tensors already loaded."""
        for layer in self._gated.values():
            pairs = [(layer.finetuned_layer, layer.base_layer)]
            if layer.finetuned_norm is not None:
                pairs.append((layer.finetuned_norm, layer.base_norm))
            for duplicate, source in pairs:
                source_state = source.state_dict(keep_vars=True)
                for key, tensor in duplicate.state_dict(keep_vars=True).items():
                    init.copy_(tensor, source_state[key])

    def backbone_key(self, key: str) -> str:
        """The plain-backbone name of one of this model's backbone state keys (`...conv.base_layer.weight` ->
        `...conv.weight`)."""
        module_name, _, tensor_name = key.rpartition(".")
        source = self._source_modules.get(module_name, module_name)
        return f"{source}.{tensor_name}" if source else tensor_name

    @torch.no_grad()
    def load_backbone_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads a plain backbone checkpoint into both banks, so the model starts as exactly that backbone."""
        own = self.backbone.state_dict()
        expanded = {}
        for key in own:
            source_key = self.backbone_key(key)
            if source_key not in state_dict:
                raise KeyError(f"Backbone checkpoint has no tensor {source_key!r} (needed for {key!r}).")
            expanded[key] = state_dict[source_key]
        unused = set(state_dict) - {self.backbone_key(key) for key in own}
        unused = {key for key in unused if not self.family.drops_tensor(key)}
        if unused:
            raise KeyError(f"Backbone checkpoint tensors with no place in the model: {sorted(unused)[:5]}.")
        self.backbone.load_state_dict(expanded, strict=True)

    def pretrained_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen tensors (pre-trained bank and ungated filters) under their plain-backbone names."""
        state = self.state_dict()
        return {name: state[key] for key, name in self.frozen_parameter_names().items()}

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> AdaFilterModelOutput | tuple:
        check_pixel_values(pixel_values, self.config.backbone_config.num_channels)
        # As transformers' vision models do: the input takes the weights' dtype (read from a tensor, not
        # `self.dtype`, which a DataParallel replica cannot answer).
        pixel_values = pixel_values.to(self.gate_controller.heads[0].weight.dtype)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        # The gate state of this call only (not `with gate_forward(...)`: torch.compile traces try/finally, not a
        # generator context manager).
        state, token = activate_gate_forward(self.gate_controller, self.config.folded_weights_check)
        try:
            outputs = self.backbone(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        finally:
            deactivate_gate_forward(token)
        gates, gate_probs = state.collect(self.gated_layer_names)
        pooled = self.family.pool(outputs)
        output = AdaFilterModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=pooled,
            hidden_states=outputs.hidden_states,
            gates=gates,
            gate_probs=gate_probs,
        )
        return output if return_dict else output.to_tuple()


class AdaFilterForImageClassification(AdaFilterPreTrainedModel):
    def __init__(self, config: AdaFilterConfig, **kwargs) -> None:
        # Keyword arguments of `from_pretrained` that are not config fields arrive here: name the closest field.
        check_known_keys(kwargs)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.adafilter = AdaFilterModel(config)
        dropout = config.classifier_dropout
        if dropout is None:
            dropout = self.adafilter.family.classifier_dropout(config.backbone_config)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.adafilter.num_features, config.num_labels)
        self.post_init()

    @property
    def gated_layer_names(self) -> list[str]:
        return self.adafilter.gated_layer_names

    @property
    def gated_layer_stages(self) -> list[str]:
        return self.adafilter.gated_layer_stages

    def set_gumbel_temperature(self, temperature: float) -> None:
        self.adafilter.set_gumbel_temperature(temperature)

    def forced_gates(self, value: float | None) -> contextlib.AbstractContextManager[None]:
        return self.adafilter.forced_gates(value)

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        return self.adafilter.gate_parameters()

    def set_gated_implementation(self, name: str) -> None:
        self.adafilter.set_gated_implementation(name)

    def print_trainable_parameters(self) -> None:
        """PEFT's summary line, with the trainable parameters split into fine-tuned bank (+ norms), gate network
        and head."""
        gates = {id(p) for p in self.gate_parameters()}
        head = {id(p) for p in self.classifier.parameters()}
        parts = {"fine-tuned bank and norms": 0, "gate network": 0, "head": 0}
        total = 0
        for parameter in self.parameters():
            total += parameter.numel()
            if parameter.requires_grad:
                part = "gate network" if id(parameter) in gates else "head" if id(parameter) in head else None
                parts[part or "fine-tuned bank and norms"] += parameter.numel()
        trainable = sum(parts.values())
        detail = ", ".join(f"{name}: {count:,}" for name, count in parts.items())
        print(
            f"trainable params: {trainable:,} ({detail}) || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def export_bank(self, bank: str) -> PreTrainedModel:
        """A plain transformers classifier of one bank: every gated layer as its `"finetuned"` or `"pretrained"`
        filters with that bank's norm, the ungated layers and the head as they are. It computes this model with
        every gate forced to that bank, without gates, for deployment where per-example selection is not wanted."""
        return plain_classifier_of_bank(self, bank)

    def export_static(self, calibration: torch.Tensor | Iterable[torch.Tensor]) -> PreTrainedModel:
        """A plain transformers classifier (no gate network, the plain backbone's cost) whose every filter is fixed
        to the bank most of its decisions chose on `calibration` (`pixel_values`, or an iterable of batches, from
        the model's image processor). Its `config.adafilter_static` records each filter's choice and how often
        the calibration decisions agreed with it; it computes this model exactly wherever they all agreed."""
        return static_classifier(self, calibration)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> AdaFilterImageClassifierOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, config.num_labels - 1]` for the cross-entropy loss.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.adafilter(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            check_labels(labels, self.config.num_labels)
            loss = self.loss_function(labels, logits, self.config)
        output = AdaFilterImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            gates=outputs.gates,
            gate_probs=outputs.gate_probs,
        )
        return output if return_dict else output.to_tuple()

    # Wraps a pretrained backbone (documented in `from_backbone.wrap_backbone`).
    from_backbone = classmethod(wrap_backbone)


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


__all__ = [
    "AdaFilterForImageClassification",
    "AdaFilterImageClassifierOutput",
    "AdaFilterModel",
    "AdaFilterModelOutput",
    "AdaFilterPreTrainedModel",
]
