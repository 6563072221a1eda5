"""FBGEMM's row-wise Adagrad as a torch optimizer, for the one kind of table FBGEMM does not update.

A data-parallel table is a replicated dense weight (TorchRec's dense kernel), so its update cannot be
fused into FBGEMM's backward. This applies the rule of ``EmbOptimType.EXACT_ROWWISE_ADAGRAD``, the CPU
default, so a table trains the same whether it is sharded or replicated:

    state[row] += mean(grad[row] ** 2)
    weight[row] -= lr * grad[row] / (sqrt(state[row]) + eps)

Example::

    >>> w = torch.nn.Parameter(torch.ones(3, 2))
    >>> opt = RowWiseAdagrad([w], lr=0.1)
    >>> w.grad = torch.tensor([[1.0, 1.0], [0.0, 0.0], [3.0, -3.0]])
    >>> opt.step()
    >>> [round(x, 4) for x in w.data[:, 0].tolist()]  # each row moves by lr along its gradient at first
    [0.9, 1.0, 0.9]
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row of each 2-D parameter (see the module docstring)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.01, eps: float = 1e-8) -> None:
        if lr <= 0 or eps <= 0:
            raise ValueError(f"lr and eps must be > 0, got {lr}, {eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError(f"row-wise Adagrad updates 2-D tables, got shape {tuple(p.shape)}")
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                grad = p.grad.float()
                state["sum"] += grad.square().mean(dim=1)
                p.sub_((group["lr"] * grad / (state["sum"].sqrt() + group["eps"])[:, None]).to(p.dtype))
        return loss
