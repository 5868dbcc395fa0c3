"""Which method should I use on my data? The comparison behind `hf-adafilter-compare` and the transfer benchmark:
plan (`plan`), runs and their cache (`runs`, `worker`), time estimates (`estimate`), statistics (`summary`), the
report (`report`, `report_sections`, `chart`), what each method costs (`costs`), and both together (`suite`)."""

from .methods import CORE_METHODS, EXTENDED_METHODS, METHOD_TITLES, METHODS
from .plan import Budget, RunSpec, Task, plan_runs
from .suite import run_comparison

__all__ = ["CORE_METHODS", "EXTENDED_METHODS", "METHODS", "METHOD_TITLES", "Budget", "RunSpec", "Task", "plan_runs",
           "run_comparison"]  # fmt: skip
