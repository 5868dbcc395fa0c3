"""The model: config, the wrapped backbone with its gated layers, the gate network, the family rules, the kernels and
the checkpoint formats. These files travel to the Hub as remote code, so they import one another relatively and
nothing else of the package (transformers resolves a remote module's relative imports as sibling files)."""
