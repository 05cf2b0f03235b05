"""Classification heads."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MLPHead"]


class MLPHead(nn.Module):
    """A small MLP classifier: ``Linear -> ReLU -> Dropout -> Linear`` (or one Linear).

    Args:
        in_dim: input features.
        num_classes: output logits.
        hidden: width of the hidden layer; 0 or None for a linear head.
        dropout: dropout before the output layer.
    """

    def __init__(self, *, in_dim: int, num_classes: int, hidden: int | None = 256, dropout: float = 0.25) -> None:
        super().__init__()
        if hidden:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """(b, in_dim) -> (b, num_classes) logits."""
        assert x.ndim == 2, f"MLPHead expects (b, in_dim), got shape {tuple(x.shape)}"
        return self.net(x)
