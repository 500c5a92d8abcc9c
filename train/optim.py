"""Row-sparse AdamW for the tag table: a step touches only the rows in the batch.

A dense AdamW over the whole table would move rows that were not in the batch (momentum keeps pushing them, weight
decay shrinks them) and cost O(table) per step. Here every row has its own first and second moments and its own
step count (so bias correction is per row), and a step reads and writes only the rows given to it.
"""

from __future__ import annotations

import math

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
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class SparseEMA:
    """Exponential moving average of table rows that touches only the rows of each step, yet is exact.

    A dense EMA would cost O(table) per step. Between two updates of a row its value is constant, so ``k`` missed
    steps fold into one closed-form update, ``ema ← d^k · ema + (1 − d^k) · value``. Every row remembers the step it
    was last brought up to date; :meth:`update` catches the stepped rows up (with their value before the step) and
    then applies the step, and :meth:`read` catches every row up to a given step. The result equals a dense EMA over
    all steps up to float rounding; the stored state (average and per-row step) makes resume exact.

    Args:
        data (`torch.Tensor`): ``(R, A, W)`` the rows at step 0; the average starts there.
        decay (`float`): the decay ``d`` per step.
    """

    def __init__(self, data: torch.Tensor, decay: float):
        self.decay = decay
        self.average = data.detach().clone()  # (R, A, W)
        self.last = torch.zeros(data.shape[0], dtype=torch.long, device=data.device)  # (R,) step it is current at

    def _factor(self, missed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``d^k`` per row, shaped to broadcast over ``like``'s rows."""
        power = torch.pow(torch.tensor(self.decay, dtype=torch.float64, device=missed.device), missed.double())
        return power.to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))

    @torch.no_grad()
    def update(self, before: torch.Tensor, after: torch.Tensor, rows: torch.Tensor, step: int) -> None:
        """Apply optimiser step ``step`` (1-based), which changed ``rows`` from ``before[rows]`` to ``after[rows]``.

        Args:
            before (`torch.Tensor`): ``(K, A, W)`` the rows' values before the step.
            after (`torch.Tensor`): ``(R, A, W)`` the table after the step.
            rows (`torch.LongTensor`): ``(K,)`` the rows the step changed.
            step (`int`): the step just taken.
        """
        factor = self._factor(step - 1 - self.last[rows], before)  # the missed steps, at the old value
        caught = factor * self.average[rows] + (1 - factor) * before
        self.average[rows] = self.decay * caught + (1 - self.decay) * after[rows]
        self.last[rows] = step

    def read(self, data: torch.Tensor, step: int) -> torch.Tensor:
        """The EMA of every row at ``step`` (a new tensor; the state is left as it is)."""
        factor = self._factor(step - self.last, data)  # (R, 1, 1)
        return factor * self.average + (1 - factor) * data

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state as named tensors, for a safetensors checkpoint."""
        return {f"{prefix}.average": self.average, f"{prefix}.last": self.last}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Restore what :meth:`state_tensors` gave."""
        self.average = tensors[f"{prefix}.average"].clone()
        self.last = tensors[f"{prefix}.last"].clone()
