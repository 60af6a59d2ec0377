"""A ReLU multilayer perceptron with an optional deep linear head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nccli.errors import UsageError
from nccli.zoo.heads import attach_head

__all__ = ["MLP"]


class MLP(nn.Module):
    """``flatten -> body (Linear+ReLU blocks) -> head (linear, no ReLU) -> classifier``.

    Inputs of any shape ``(N, ...)`` are flattened to ``(N, in_dim)`` first, so the model
    takes images directly.  ``widths`` may be a single int for one hidden layer or an
    empty list for no body at all (then the penultimate feature is the input itself).
    """

    def __init__(
        self,
        in_dim: int,
        widths: Sequence[int] | int,
        num_classes: int,
        head_depth: int = 0,
        head_width: int | None = None,
        head_bias: bool = True,
        etf_classifier: bool = False,
        classifier_bias: bool = True,
    ) -> None:
        super().__init__()
        widths = [widths] if isinstance(widths, int) else list(widths)
        if in_dim < 1 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise UsageError(
                f"mlp: in_dim and widths must be positive integers, got in_dim={in_dim}, "
                f"widths={widths}"
            )
        self.flatten = nn.Flatten()
        blocks: list[nn.Module] = []
        #: one sample's input shape, so `nccli info` can probe without --data
        self.nccli_input_shape = (in_dim,)
        d = in_dim
        for w in widths:
            blocks += [nn.Linear(d, w), nn.ReLU()]
            d = w
        self.body = nn.Sequential(*blocks)
        attach_head(
            self,
            d,
            num_classes,
            head_depth=head_depth,
            head_width=head_width,
            head_bias=head_bias,
            etf_classifier=etf_classifier,
            classifier_bias=classifier_bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``(N, num_classes)``."""
        return self.classifier(self.head(self.body(self.flatten(x))))
