"""Row-sparse AdamW for the tag table: a step touches only the rows in the batch.

A dense AdamW over the whole table would move rows that were not in the batch (momentum keeps pushing them, weight
decay shrinks them) and cost O(table) per step. Here every row has its own first and second moments and its own
step count (so bias correction is per row), and a step reads and writes only the rows given to it.
"""

from __future__ import annotations

import torch


class RowSparseAdamW:
    """AdamW with decoupled weight decay, applied row by row.

    Args:
        num_rows (`int`): rows of the table (grows with :meth:`grow`).
        row_shape (`tuple[int, ...]`): shape of one row, e.g. ``(anchors, width)``.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Adam betas.
        eps (`float`, defaults to 1e-8): Adam epsilon.
        weight_decay (`float`, defaults to 0.0): decoupled weight decay, applied only to the rows stepped.
        device (`torch.device`, *optional*): where the state lives.
    """

    def __init__(self, num_rows: int, row_shape: tuple[int, ...], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, device: torch.device | str | None = None):
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.exp_avg = torch.zeros(num_rows, *row_shape, device=device)  # (R, A, W)
        self.exp_avg_sq = torch.zeros(num_rows, *row_shape, device=device)  # (R, A, W)
        self.steps = torch.zeros(num_rows, dtype=torch.long, device=device)  # (R,)

    def grow(self, num_rows: int) -> None:
        """Add zero state for rows appended to the table."""
        extra = num_rows - self.steps.shape[0]
        if extra > 0:
            pad = self.exp_avg.new_zeros(extra, *self.exp_avg.shape[1:])
            self.exp_avg = torch.cat([self.exp_avg, pad])
            self.exp_avg_sq = torch.cat([self.exp_avg_sq, pad.clone()])
            self.steps = torch.cat([self.steps, self.steps.new_zeros(extra)])

    @torch.no_grad()
    def step(self, data: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """Update ``data[rows]`` in place from ``grad`` (one gradient per listed row).

        Args:
            data (`torch.Tensor`): ``(R, A, W)`` the table rows.
            rows (`torch.LongTensor`): ``(K,)`` unique rows to update.
            grad (`torch.Tensor`): ``(K, A, W)`` their gradients.
            lr (`float`): learning rate of this step.
        """
        if rows.numel() == 0:
            return
        beta1, beta2 = self.betas
        steps = self.steps[rows] + 1  # (K,)
        self.steps[rows] = steps
        m = self.exp_avg[rows].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.exp_avg[rows] = m
        self.exp_avg_sq[rows] = v
        shape = (-1,) + (1,) * (grad.dim() - 1)
        bias1 = (1 - beta1 ** steps.to(torch.float64)).to(grad.dtype).view(shape)
        bias2 = (1 - beta2 ** steps.to(torch.float64)).to(grad.dtype).view(shape)
        p = data[rows]
        if self.weight_decay:
            p.mul_(1 - lr * self.weight_decay)
        p.addcdiv_(m / bias1, (v / bias2).sqrt_().add_(self.eps), value=-lr)
        data[rows] = p

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state as named tensors, for a safetensors checkpoint."""
        return {f"{prefix}.exp_avg": self.exp_avg, f"{prefix}.exp_avg_sq": self.exp_avg_sq,
                f"{prefix}.steps": self.steps}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Restore what :meth:`state_tensors` gave."""
        self.exp_avg = tensors[f"{prefix}.exp_avg"].clone()
        self.exp_avg_sq = tensors[f"{prefix}.exp_avg_sq"].clone()
        self.steps = tensors[f"{prefix}.steps"].clone()


def lr_at(step: int, base_lr: float, schedule: str, warmup: int, total: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warmup, then constant / linear / cosine decay."""
    import math

    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
