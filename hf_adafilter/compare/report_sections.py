"""The report's detail sections: fit, gate diagnostics, time, what each method trains and saves, the learning
rates chosen on validation, and the setup that reproduces it."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from ..training.arguments import AdaFilterArguments
from .estimate import minutes
from .methods import ADAFILTER_METHODS, METHOD_TITLES
from .plan import Budget, Task, train_images


def percent(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def method_by_task(cells: dict, names: Sequence[str], methods: Sequence[str], text) -> list[str]:
    """A method x task table: the header, then a row per method whose cells are `text(method, cell)` (the cell of
    that task and method, or None where it did not run)."""
    lines = ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for method in methods:
        row = [text(method, cells.get(task, {}).get(method)) for task in names]
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(row) + " |")
    return lines


def fit_section(cells: dict, names: Sequence[str], methods: Sequence[str]) -> list[str]:
    """Training accuracy next to test accuracy: which methods fit their training set (the regime where
    fine-tuning can overfit) and which underfit."""

    def train_accuracy(method: str, cell: dict | None) -> str:
        value = cell.get("train_accuracy_mean") if cell else None
        return percent(value) if value is not None else "–"

    lines = ["", "## Fit: training accuracy (%), mean over seeds", "",
             "Accuracy on the training images with the evaluation transform, after training.", ""]  # fmt: skip
    return lines + method_by_task(cells, names, methods, train_accuracy)


def gate_section(cells: dict, names: Sequence[str], methods: Sequence[str]) -> list[str]:
    ada = [m for m in methods if m in ADAFILTER_METHODS]
    if not ada:
        return []

    def shown(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "–" if value is None else f"{scale * value:.{digits}f}"

    lines = ["", "## Do the learned gates help? (AdaFilter variants)", "",
             "Test accuracy (%) of the same trained models with their learned gates, with every gate forced to the "
             "fine-tuned bank (F), and with every gate forced to the pre-trained bank (S); learned gates earn their "
             "cost only if they beat both. Static export: the model `export_static` returns (a plain classifier, "
             "each filter fixed to the bank most of 256 training images chose; serving at the plain backbone's "
             "cost), and the share of those calibration decisions its fixed choices reproduce. Mean over seeds.", "",
             "| method | task | learned | all F | all S | learned beats both | static export | calibration agreement |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method in ada:
        for task in names:
            cell = cells.get(task, {}).get(method)
            if not cell:
                continue
            forced = [cell.get(f"forced_{bank}_test_accuracy_mean") for bank in ("finetuned", "pretrained")]
            beats = "–" if None in forced else "yes" if cell["test_accuracy_mean"] > max(forced) else "**no**"
            lines.append(f"| {METHOD_TITLES[method]} | {task} | {percent(cell['test_accuracy_mean'])} | "
                         f"{shown(forced[0], 100, 1)} | {shown(forced[1], 100, 1)} | {beats} | "
                         f"{shown(cell.get('static_test_accuracy_mean'), 100, 1)} | "
                         f"{shown(cell.get('static_agreement'), 100, 1)}{'' if cell.get('static_agreement') is None else '%'} |")  # fmt: skip
    lines += ["", "Gate diagnostics. Fine-tuned fraction: share of filters using F (weighted by filter count) on "
              "validation / test. Example-dependent: share of filters whose decision differs between the images of a "
              "batch (test). Last training steps: share of sampled training decisions equal to the evaluation "
              "decision, and mean |log-odds|. Collapsed layers: gated layers whose validation fraction is ≤ 2% "
              "(all S) or ≥ 98% (all F).", "",
              "| method | task | fine-tuned fraction (val / test) | example-dependent | train = eval decisions | "
              "mean abs log-odds | collapsed all-S | collapsed all-F |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method in ada:
        for task in names:
            cell = cells.get(task, {}).get(method)
            if not cell:
                continue
            total = cell.get("gated_layers", 0)
            lines.append(f"| {METHOD_TITLES[method]} | {task} | {shown(cell.get('finetuned_fraction_validation'), digits=3)} / "
                         f"{shown(cell.get('finetuned_fraction_test'), digits=3)} | {shown(cell.get('example_dependent_test'), digits=3)} | "
                         f"{shown(cell.get('train_train_eval_agreement'), digits=3)} | {shown(cell.get('train_mean_abs_log_odds'))} | "
                         f"{cell['collapsed_layers_all0']:.1f} / {total} | {cell['collapsed_layers_all1']:.1f} / {total} |")  # fmt: skip
    return lines


def timing_section(cells: dict, names: Sequence[str], methods: Sequence[str]) -> list[str]:
    lines = ["", "## Time per final run (median over tasks and seeds)", "",
             "| method | wall time per run (s) | of which training (s) | peak RSS (MB) |", "|---|---|---|---|"]  # fmt: skip
    for method in methods:
        run_cells = [cells[t][method] for t in names if method in cells.get(t, {})]
        if not run_cells:
            continue
        wall = statistics.median(c["wall_s_median"] for c in run_cells)
        train = statistics.median(c["train_s_median"] for c in run_cells)
        rss = max(c["peak_rss_mb_max"] for c in run_cells)
        lines.append(f"| {METHOD_TITLES[method]} | {wall:.0f} | {train:.0f} | {rss:.0f} |")
    return lines


def cost_section(costs: dict[str, dict], methods: Sequence[str], meta: dict) -> list[str]:
    """Trainable parameters and saved size per method: what choosing a method costs beyond accuracy."""
    if not costs:
        return []
    lines = ["", "## What each method trains and saves", "",
             f"`{meta['model']}` with a {meta.get('cost_num_labels', '?')}-class head, saved as `examples/run.py` "
             "saves it (fp32 safetensors). LoRA saves a PEFT adapter (LoRA matrices, head, BatchNorms) that loads "
             "onto the base backbone; an AdaFilter model also saves compact (`save_pretrained(compact=True)`: the "
             "fine-tuned bank, norms, gates and head, on the base backbone).", "",
             "| method | trainable parameters | of all | saved (MB) | compact (MB) |", "|---|---|---|---|---|"]  # fmt: skip
    for method in methods:
        cost = costs.get(method)
        if cost is None:
            continue
        compact = cost.get("compact_bytes")
        lines.append(f"| {METHOD_TITLES[method]} | {cost['trainable_parameters']:,} | "
                     f"{cost['trainable_parameters'] / cost['total_parameters']:.1%} | {cost['saved_bytes'] / 1e6:.1f} | "
                     f"{'–' if compact is None else f'{compact / 1e6:.1f}'} |")  # fmt: skip
    return lines


def selection_section(cells: dict, names: Sequence[str], methods: Sequence[str], budget: Budget) -> list[str]:
    def tried(method: str, cell: dict | None) -> str:
        if not cell:
            return "–"
        chosen = f"{cell['learning_rate']:g}"
        grid = {f"{lr:g}" for lr in budget.lr_grids.get(method, ())}
        marks = {lr: "" if lr in grid else "⁺" for lr in cell["selection"]}
        entries = [f"**{lr}{marks[lr]}: {100 * acc:.1f}**" if lr == chosen else f"{lr}{marks[lr]}: {100 * acc:.1f}"
                   for lr, acc in sorted(cell["selection"].items(), key=lambda item: float(item[0]))]  # fmt: skip
        source = budget.lr_from.get(method)
        empty = f"**{chosen}** ({'from ' + METHOD_TITLES[source] if source else 'grid of one'})"
        return ", ".join(entries) if entries else empty

    lines = ["", "## Learning rates chosen on the validation split", "",
             "Validation accuracy (%) of each LR of the grid on the selection "
             f"({seeds_text(budget.selection_seeds)}, mean); the chosen LR in bold. The final seeds never take part in "
             "the choice.", ""]  # fmt: skip
    return lines + method_by_task(cells, names, methods, tried)


def setup_section(tasks: Sequence[Task], budget: Budget, meta: dict) -> list[str]:
    lines = ["", "## Setup", "",
             f"- Command: `{meta['command']}`",
             f"- Date: {meta['date']}; {meta['runs']} runs ({meta['test_evaluations']} of them evaluated the test "
             f"split, once each). {suite_time_text(meta)}",
             f"- Machine: {meta['machine']}.",
             f"- Backbone: `{meta['model']}`; every run goes through `examples/run.py` in its own process.",
             f"- Budget, identical for every method: {length_text(budget, tasks)} at batch {budget.train_batch_size}, "
             f"{image_size_text(budget)}, AdamW, linear decay after {budget.warmup:.0%} warm-up, weight decay "
             f"{budget.weight_decay:g}; augmentation: random resized crop (at least {budget.min_crop_scale:.0%} of "
             f"the image area) and horizontal flip{flip_text(budget, tasks)}; evaluation at the end only (resize + "
             f"centre crop). Final seeds {', '.join(map(str, budget.seeds))}; LR selection on "
             f"{seeds_text(budget.selection_seeds)}{lr_from_text(budget)}.",
             f"- Every other setting is what `examples/run.py` gives every user: {defaults_text(budget)}.",
             "- Tasks:"]  # fmt: skip
    for task in tasks:
        record = task.record
        source = (f"`benchmarks/prepare_data.py --scale {record['scale']}`, seed {record['seed']}" if "scale" in record
                  else f"`{record.get('source', '')}`")  # fmt: skip
        if "sizes_per_split" in record:
            sizes = record["sizes_per_split"]
            lines.append(f"  - `{task.name}`: {len(record['classes'])} classes ({', '.join(record['classes'])}); "
                         f"{sizes['train']} train / {sizes.get('validation', '–')} validation / {sizes['test']} test "
                         f"images ({source}).")  # fmt: skip
        else:
            lines.append(f"  - `{task.name}`: {source}.")
    if not meta.get("gpu"):
        lines.append("- GPU times are **not measured here**: this machine has no GPU (the same command measures "
                     "them where one is available).")  # fmt: skip
    lines.append("- Raw results of every run: the `.json` beside this file; the chart: the `.png`.")

    return lines


def seeds_text(seeds: Sequence[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def suite_time_text(meta: dict) -> str:
    """What the suite costs from scratch (the runs' own times, added up), per method set, and what this invocation
    ran itself (the rest came from --resume)."""
    sets = meta.get("run_time_s_by_method_set", {})
    per_set = "; ".join(f"{name}: {minutes(seconds)}" for name, seconds in sets.items())
    resumed = meta.get("runs_resumed", 0)
    this = f"This invocation ran {meta['runs'] - resumed} of them in {minutes(meta['total_wall_s'])}"
    return f"Time of the runs, added up: {per_set}. {this}{f' and resumed {resumed}' if resumed else ''}."


def length_text(budget: Budget, tasks: Sequence[Task]) -> str:
    if budget.max_steps is not None:
        return f"{budget.max_steps} steps"
    steps = ", ".join(f"{t.name} {budget.steps(train_images(t))}" for t in tasks if train_images(t))
    return f"{budget.epochs} epochs (steps: {steps})"


def image_size_text(budget: Budget) -> str:
    return "the backbone's image size" if budget.image_size is None else f"{budget.image_size} px"


def flip_text(budget: Budget, tasks: Sequence[Task]) -> str:
    unflipped = [t.name for t in tasks if t.name in budget.unflipped_tasks]
    return f" (not for {', '.join(unflipped)}: a mirror image changes its classes)" if unflipped else ""


def lr_from_text(budget: Budget) -> str:
    text = ""
    if budget.lr_from:
        shared = ", ".join(
            f"{METHOD_TITLES[m]} takes {METHOD_TITLES[s]}'s" for m, s in budget.lr_from.items()
        )
        text += f"; the ablations share the LR chosen for AdaFilter ({shared})"
    if budget.grid_extensions:
        text += (f"; when the best LR is at an edge of the grid, the grid is extended by one step that way (up to "
                 f"{budget.grid_extensions}x; extended LRs are marked ⁺ in the selection table)")  # fmt: skip
    return text


def defaults_text(budget: Budget) -> str:
    """The training script's defaults the runs use (read from the package, so the report cannot drift)."""
    defaults = AdaFilterArguments()
    momentum = (
        budget.batchnorm_momentum if budget.batchnorm_momentum is not None else defaults.batchnorm_momentum
    )
    gate_lr = (
        budget.gate_learning_rate if budget.gate_learning_rate is not None else defaults.gate_learning_rate
    )
    return (
        f"BatchNorm momentum {momentum:g} (PyTorch meaning; the linear probe keeps the pretrained statistics); for "
        f"AdaFilter: gate learning rate {gate_lr:g}, prior log-odds {defaults.gate_init_log_odds:g}, Gumbel "
        f"temperature {defaults.gumbel_temperature_start:g} → {defaults.gumbel_temperature_end:g} (geometric), "
        f"decision noise {defaults.gate_noise_start:g} → {defaults.gate_noise_end:g} (linear), gate regulariser "
        f"{defaults.gate_regularization}"
    )
