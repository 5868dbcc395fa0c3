"""AdaFilter: adaptive per-example filter fine-tuning for Hugging Face vision backbones."""

__version__ = "0.1.0"
