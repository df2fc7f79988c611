"""The seeds' toy model: two scalar-multiplying "heads" per layer on a 2-d residual."""

from __future__ import annotations

import torch
from torch import nn


class MicroBlock(nn.Module):
    """Copies the residual to two heads; head ``h`` multiplies it elementwise by ``weights[h]``.

    Input ``[batch, seq, 2]`` -> head inputs ``[batch, seq, 2 (head), 2]`` -> output, the
    sum over heads, ``[batch, seq, 2]``.
    """

    def __init__(self):
        super().__init__()
        self.head_inputs = nn.Identity()
        self.head_outputs = nn.Identity()
        self.weights = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.head_inputs(x.unsqueeze(-2).expand(*x.shape[:-1], 2, x.shape[-1]))
        return self.head_outputs(heads * self.weights).sum(dim=-2)


class MicroModel(nn.Module):
    """``x_{l+1} = x_l + block_l(x_l)`` for ``n_layers`` blocks; input/output ``[batch, seq, 2]``."""

    def __init__(self, n_layers: int = 2):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_layers = n_layers
        self.input = nn.Identity()
        self.blocks = nn.ModuleList(MicroBlock() for _ in range(n_layers))
        self.resids = nn.ModuleList(nn.Identity() for _ in range(n_layers))
        self.output = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input(x)
        for block, resid in zip(self.blocks, self.resids):
            x = resid(x + block(x))
        return self.output(x)
