"""Training: the Trainer, the gate regularisers, what each `--method` trains, the command-line arguments, the rerun
policy and the training script."""
