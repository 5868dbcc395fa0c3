"""What the Trainer leaves in `output_dir` for people and the Hub: the gate analysis (per-layer fractions and plot),
the AdaFilter model card, a token-free `training_args.json` and a `.gitignore` keeping the pickled arguments off
the Hub, and with `--save_compact` a compact final model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers.trainer import TRAINING_ARGS_NAME

from ..hub.model_card import (
    GATE_FRACTIONS_FILE,
    PLOT_FILE,
    last_eval_metrics,
    processor_image_size,
    render_model_card,
    training_settings,
)
from ..hub.plots import plot_gate_fractions
from ..modeling.modeling_adafilter import AdaFilterPreTrainedModel

# `trainer.push_to_hub` uploads the whole output_dir, with the Trainer's pickled TrainingArguments. Nothing loads it
# and unpickling it would run code, so a .gitignore keeps it off the Hub (the Hub skips the files a .gitignore in the
# commit names); training_args.json carries the same settings as plain JSON.
HUB_IGNORED_FILES = ("training_args.bin",)
TRAINING_ARGS_JSON = "training_args.json"


class HubOutputsMixin:
    """Mixed into `AdaFilterTrainer` (before `transformers.Trainer`). The one owner of the gate analysis files:
    written here (`save_gate_analysis`), read back here for a later model card."""

    def save_gate_analysis(self) -> None:
        """The paper's per-layer analysis of the last evaluation: the share of fine-tuned filters per gated layer
        (`gate_fractions.json`) and its plot, in output_dir."""
        fractions = self.last_eval_gate_fractions
        if not fractions or not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        stages = getattr(self.model, "gated_layer_stages", None)
        (output_dir / GATE_FRACTIONS_FILE).write_text(json.dumps(fractions, indent=2) + "\n")
        plot_gate_fractions(fractions, output_dir / PLOT_FILE, stages=stages)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        image_size: int | None = None,
    ) -> None:
        """Writes output_dir/README.md, which `push_to_hub` uploads: the AdaFilter card (evaluation results,
        training settings, fine-tuned fraction per layer and its plot) or, for the baselines, transformers' card.

        `image_size` is the training crop when it differs from the image processor's; `dataset_tags` are Hub
        dataset ids (the card's `datasets`), `dataset` a display name.
        """
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, AdaFilterPreTrainedModel):
            super().create_model_card(
                language=language,
                license=license,
                tags=tags,
                model_name=model_name,
                finetuned_from=finetuned_from,
                tasks=tasks,
                dataset_tags=dataset_tags,
                dataset=dataset,
                dataset_args=dataset_args,
            )
        elif self.is_world_process_zero():
            output_dir = Path(self.args.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            fractions = self.last_eval_gate_fractions or _read_json(output_dir / GATE_FRACTIONS_FILE)
            image_size = image_size or processor_image_size(self.processing_class)
            card = render_model_card(
                model,
                repo_id=self.hub_model_id or self.args.hub_model_id or model_name,
                model_name=model_name,
                base_model=finetuned_from,
                dataset_name=dataset if isinstance(dataset, str) else ", ".join(dataset or []) or None,
                dataset_ids=dataset_tags,
                eval_metrics=last_eval_metrics(self.state.log_history),
                training=training_settings(
                    self.args,
                    self.adafilter_args,
                    model,
                    self.state.global_step,
                    image_size,
                    mixed_precision=str(self.accelerator.mixed_precision),
                ),
                gate_fractions=fractions,
                plot_file=PLOT_FILE if (output_dir / PLOT_FILE).is_file() else None,
                tags=[tags] if isinstance(tags, str) else tags or (),
                license=license,
                language=language,
            )
            card.save(output_dir / "README.md")
        self._write_hub_files()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """With `--save_compact`, the final model in `output_dir` (what `save_model` and `push_to_hub` write) is a
        compact checkpoint; `checkpoint-N` folders stay full for resuming."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        final = Path(output_dir).resolve() == Path(self.args.output_dir).resolve()
        if not (self.adafilter_args.save_compact and final and isinstance(model, AdaFilterPreTrainedModel)):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        model.save_pretrained(output_dir, compact=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, Path(output_dir) / TRAINING_ARGS_NAME)
        return None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Mid-training pushes (hub_strategy) upload output_dir too: the pickle stays local there as well.
        self._write_hub_files()
        super()._push_from_checkpoint(checkpoint_folder)

    def _write_hub_files(self) -> None:
        """.gitignore (keeps training_args.bin off the Hub) and training_args.json, in output_dir."""
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        gitignore = output_dir / ".gitignore"
        lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
        missing = [name for name in HUB_IGNORED_FILES if name not in lines]
        if missing:
            gitignore.write_text("".join(f"{line}\n" for line in [*lines, *missing]))
        (output_dir / TRAINING_ARGS_JSON).write_text(self.args.to_json_string())


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
