"""Row-sparse AdamW and EMA for the tag table: a step touches only the rows in the batch, state exists only for them.

A dense AdamW over the whole table would move rows that were not in the batch (momentum keeps pushing them, weight
decay shrinks them) and cost O(table) per step. Here every row has its own first and second moments and its own
step count (so bias correction is per row), and a step reads and writes only the rows given to it.

State is allocated on a row's first touch: a row → slot map points into slot storage that grows by doubling, so
memory follows the rows a run has touched, not the table's size (a 100k-tag table whose data holds 5k tags keeps
moments for 5k rows). The state lives on the device of the
table data it updates: a host-resident table keeps its moments in host memory too. torch.optim cannot do this (its
state is dense per parameter), hence the hand-written optimiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from conditioner.rows import RowSlots, RowSparseAdamW  # noqa: F401 (RowSparseAdamW: part of this API)

#: The table learning rate when ``training.lr`` is unset: by what trains (``"new concepts"`` over a frozen table, or
#: ``"every tag"``) and the layout (``"layers"``: per-block or per-layer vector rows, ``"single"``: one vector for
#: every layer, ``"kv"``: direct key/value rows). The one home of these figures: :func:`default_lr`, the config
#: reference (``training.lr``) and the benchmarks read them.
TABLE_LR = {
    "new concepts": {"layers": 0.3, "single": 0.5, "kv": 0.15},
    "every tag": {"layers": 1e-2, "single": 5e-2, "kv": 5e-2},
}


def lr_layout(table) -> str:
    """The :data:`TABLE_LR` column of a table: ``"kv"``, ``"single"`` or ``"layers"``."""
    return "kv" if table.mode_spec.direct_kv else "single" if len(table.group_names) == 1 else "layers"


def table_lr_text() -> str:
    """:data:`TABLE_LR` in words, for the config reference."""
    new, every = TABLE_LR["new concepts"], TABLE_LR["every tag"]
    return (f"with table.freeze_existing (new concepts only) {new['layers']:g} per-block / per-layer, "
            f"{new['single']:g} single-group, {new['kv']:g} key/value; otherwise (every tag trains) "
            f"{every['layers']:g}, {every['single']:g}, {every['kv']:g}")


def default_lr(table, new_concepts_only: bool = False) -> float:
    """The table learning rate when ``training.lr`` is unset, by what trains and the layout — each the best measured
    on the miniature SD (BENCHMARKS.md):

    - new concepts over a frozen table (``table.freeze_existing: true``; "Learning rates on the users' path": 4 and
      10 new concepts bootstrapped from nonsense names, 200 steps of batch 16): 0.3 for per-block / per-layer vector
      rows, 0.5 for one vector shared by every layer, 0.15 for direct key/value rows. Such rows start far from
      what they must learn, and the steps that move them are large (1e-2 / 5e-2 left 4–21% of them right, these
      70–86%).
    - every tag of the data trains (the default; "What dropping CLIP keeps": all of a bootstrapped table's tags
      fine-tuned together, 1,000 steps of batch 32): 1e-2 per-block / per-layer, 5e-2 single and key/value. Their
      rows start where the model's CLIP put them; at 0.5 a `single` table fell from 98% of one-object samples
      right (5e-2) to 23%.
    """
    return TABLE_LR["new concepts" if new_concepts_only else "every tag"][lr_layout(table)]


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

    A dense EMA would cost O(table) per step and a copy of the whole table. Between two updates of a row its value is
    constant, so ``k`` missed steps fold into one closed-form update, ``ema ← d^k · ema + (1 − d^k) · value``. Every
    row remembers the step it was last brought up to date; :meth:`update` catches the stepped rows up (with their
    value before the step) and then applies the step, and :meth:`read` catches every row up to a given step. A row
    never stepped still holds its starting value, which is its average too, so averages are stored only for rows
    stepped at least once (allocated on first touch, like :class:`RowSparseAdamW`'s moments). The result equals a
    dense EMA over all steps up to float rounding; the stored state (averages, their rows and per-row steps) makes
    resume exact.

    Args:
        data (`torch.Tensor`): ``(R, A, W)`` the rows at step 0; the average starts there.
        decay (`float`): the decay ``d`` per step.
    """

    def __init__(self, data: torch.Tensor, decay: float):
        self.decay = decay
        self._slots = RowSlots(data.shape[0], tuple(data.shape[1:]), ("average",), data.device, torch.float32)
        self.last = torch.zeros(data.shape[0], dtype=torch.long, device=data.device)  # (R,) step it is current at

    @property
    def allocated_rows(self) -> int:
        """How many rows hold an average of their own (rows stepped at least once)."""
        return self._slots.used

    @property
    def average(self) -> torch.Tensor:
        """``(U, A, W)`` the stored averages, in slot order (rows in ``state_tensors(...)[PREFIX.rows]``)."""
        return self._slots.store["average"][: self._slots.used]

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
        device = after.device
        if self.last.device != device:
            self.last = self.last.to(device)
            self._slots.to(device)
        rows, before = rows.to(device), before.to(device=device, dtype=torch.float32)
        slots, new = self._slots.lookup(rows)
        store = self._slots.store["average"]
        store[slots[new]] = before[new]  # first touch: the average so far is the starting value
        factor = self._factor(step - 1 - self.last[rows], before)  # the missed steps, at the old value
        caught = factor * store[slots] + (1 - factor) * before
        store[slots] = self.decay * caught + (1 - self.decay) * after[rows].float()
        self.last[rows] = step

    def read(self, data: torch.Tensor, step: int) -> torch.Tensor:
        """The EMA of every row at ``step`` (a new tensor; the state is left as it is)."""
        s = self._slots
        out = data.detach().clone()
        if s.used:
            rows = s.rows[: s.used].to(data.device)
            average = s.store["average"][: s.used].to(data.device)
            factor = self._factor(step - self.last.to(data.device)[rows], average)  # (U, 1, 1)
            out[rows] = (factor * average + (1 - factor) * data[rows].float()).to(data.dtype)
        return out

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state as named tensors, for a safetensors checkpoint (``PREFIX.rows``, ``.average``, ``.last``)."""
        return self._slots.state_tensors(prefix) | {f"{prefix}.last": self.last}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Restore what :meth:`state_tensors` gave (also a dense average without ``PREFIX.rows``)."""
        self.last = tensors[f"{prefix}.last"].clone().to(self.last.device)
        self._slots.grow_rows(self.last.shape[0])
        average = tensors[f"{prefix}.average"]
        rows = tensors.get(f"{prefix}.rows")
        if rows is None:  # dense: one average per row
            rows = torch.arange(average.shape[0])
        self._slots.load(rows, {"average": average})


@dataclass
class SparseParam:
    """One learnable tensor of the table, stepped row-sparsely, with its AdamW state and optional EMA.

    The trainer keeps a list of these (tag rows, special rows, SDXL's pooled rows) and steps, clips, averages,
    checkpoints and restores them in one loop.

    Attributes:
        attr (`str`): the ``TagTable`` attribute it trains (``data``, ``special``, ``pooled``; ``data.shared``,
            ``data.coef``, ``data.basis`` for factorised rows), also its field of ``conditioner.encode.Rows``.
        name (`str`): checkpoint prefix of its optimiser state; ``ema_name`` that of its EMA.
        optimizer (`RowSparseAdamW`): its AdamW state, per row.
        ema (`SparseEMA | None`): its EMA (``training.ema_decay``), or `None`.
        per_tag (`bool`): its rows are tag rows gathered per batch (and subject to ``table.freeze_existing``);
            otherwise every row of the tensor is in every step (the special rows).
        trainable (`bool`): stepped at all (the special rows may stay frozen).
        lr_scale (`float`): this tensor's learning rate relative to ``training.lr`` (factorised rows: see
            :data:`conditioner.factor.LR_SCALE`).
    """

    attr: str
    name: str
    ema_name: str
    optimizer: RowSparseAdamW
    ema: SparseEMA | None
    per_tag: bool
    trainable: bool = True
    lr_scale: float = 1.0

    def tensor(self, table) -> torch.Tensor:
        """This parameter's tensor in ``table`` (``data.shared`` … name a factor of factorised rows)."""
        return table_tensor(table, self.attr)

    def set_tensor(self, table, value) -> None:
        """Replace this parameter's tensor in ``table``."""
        owner, _, name = self.attr.rpartition(".")
        setattr(table_tensor(table, owner) if owner else table, name, value)


    def step(self, table, rows: torch.Tensor, grad: torch.Tensor, lr: float, step: int) -> None:
        """AdamW on ``rows`` of this tensor in ``table`` (and their EMA)."""
        data = self.tensor(table)
        before = data[rows].clone() if self.ema is not None else None
        self.optimizer.step(data, rows, grad, lr * self.lr_scale)
        if self.ema is not None:
            self.ema.update(before, data, rows, step)

    def averaged(self, table, step: int) -> torch.Tensor:
        """The EMA of this tensor, caught up to ``step`` (requires ``ema``)."""
        return self.ema.read(self.tensor(table), step)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimiser and EMA state, for a checkpoint."""
        out = self.optimizer.state_tensors(self.name)
        return (out | self.ema.state_tensors(self.ema_name)) if self.ema is not None else out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` saved."""
        self.optimizer.load_state_tensors(tensors, self.name)
        if self.ema is not None:
            self.ema.load_state_tensors(tensors, self.ema_name)


def table_tensor(table, attr: str):
    """``table.data``, ``table.special`` … or, for a dotted name, a part of one (``data.shared``)."""
    owner, _, name = attr.rpartition(".")
    return getattr(table_tensor(table, owner) if owner else table, name)
