"""`python -m hf_adafilter.compare`: the same command as `hf-adafilter-compare`."""

from .cli import run

run()
