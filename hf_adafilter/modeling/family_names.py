"""The backbone families AdaFilter supports, by transformers `model_type`: a torch-free table the config checks
names against (the families' rules, which need torch, are `backbones.FAMILIES`).

Travels to the Hub as remote code: relative imports only, nothing beyond the standard library.
"""

SUPPORTED_FAMILIES: tuple[str, ...] = (
    "resnet", "efficientnet", "convnext", "regnet", "mobilenet_v2", "bit",  # CNNs: conv filters
    "vit", "deit", "dinov2", "swin",  # vision transformers: the output features of their MLP linears
)  # fmt: skip
