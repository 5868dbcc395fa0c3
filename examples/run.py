#!/usr/bin/env python
"""Fine-tune an image classifier with AdaFilter (or a baseline) through the transformers Trainer.

    accelerate launch examples/run.py --model_name_or_path efficientnet-lite0 \\
        --train_dir data/train --validation_dir data/val --method adafilter \\
        --output_dir out --do_train --do_eval --num_train_epochs 3

With no arguments it runs the embedded default: the packaged ImageNet EfficientNet-Lite0 fine-tuned with
AdaFilter on the Fashion-MNIST subset shipped in examples/data (a few minutes on 2 CPU cores).
The result loads with `AutoModelForImageClassification.from_pretrained(output_dir)`.

The code is `hf_adafilter/training/cli.py`, also installed as the `hf-adafilter-train` console script.
"""

from hf_adafilter.training.cli import *  # noqa: F403  (tests and benchmarks load this file as a module)
from hf_adafilter.training.cli import run

if __name__ == "__main__":
    run()
