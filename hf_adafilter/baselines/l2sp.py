"""L2-SP (Li, Grandvalet, Davoine, ICML 2018): fine-tuning that is pulled back towards the pre-trained weights.

The penalty is `alpha/2 * ||w - w0||^2` over the pre-trained parameters (w0: their values before training) plus
`beta/2 * ||w||^2` over the new head. It replaces weight decay on every parameter it covers: plain decay pulls
towards 0, which is the very thing L2-SP is meant not to do.
"""

from __future__ import annotations

import torch
from torch import nn

# The paper's usual setting (its grid's best on most of its targets).
L2SP_ALPHA = 0.1
L2SP_BETA = 0.01


class L2SPPenalty:
    """The L2-SP penalty of one model, called once per training step.

    The reference weights are a frozen copy taken at construction (so before any training or checkpoint resume),
    held outside the model: they are not saved with it and take no gradient.
    """

    def __init__(self, model: nn.Module, head: nn.Module, alpha: float = L2SP_ALPHA, beta: float = L2SP_BETA):
        if alpha < 0 or beta < 0:
            raise ValueError(f"L2-SP needs alpha >= 0 and beta >= 0, got alpha={alpha}, beta={beta}.")
        self.alpha, self.beta = alpha, beta
        head_ids = {id(p) for p in head.parameters()}
        self.pretrained = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        self.head = [p for p in head.parameters() if p.requires_grad]
        self.reference = [p.detach().clone() for p in self.pretrained]

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the penalty covers (the trainer switches weight decay off for these)."""
        return self.pretrained + self.head

    def drift(self) -> torch.Tensor:
        """`||w - w0||^2` over the pre-trained parameters: 0 before the first step."""
        if self.reference and self.reference[0].device != self.pretrained[0].device:
            self.reference = [r.to(p.device) for r, p in zip(self.reference, self.pretrained, strict=True)]
        return torch.stack(
            [(p - r).pow(2).sum() for p, r in zip(self.pretrained, self.reference, strict=True)]
        ).sum()

    def head_norm(self) -> torch.Tensor:
        """`||w||^2` over the new head."""
        return torch.stack([p.pow(2).sum() for p in self.head]).sum()

    def __call__(self) -> torch.Tensor:
        return self.alpha / 2 * self.drift() + self.beta / 2 * self.head_norm()
