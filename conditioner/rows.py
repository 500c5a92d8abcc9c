"""Row stores: a row → slot map over growable storage, disk-backed table rows and the row-sparse AdamW built on it.

``RowSlots`` is the storage the row-sparse optimiser, the sparse EMA and disk-backed rows share: state for a row is
allocated on its first touch, so memory follows the rows used, not the table's size.

``DiskRows`` stands in for a table's ``(R, A, W)`` row tensor when the table is larger than memory
(``training.table_device: disk``): rows are read from a read-only memory map of the table file, and every row written
since (or appended after the file's last row) is held in memory as fp32. Gathering ``rows[ids]`` reads only those
rows' pages; nothing is ever written into the mapped file. ``held()`` lists the rows in memory — what a checkpoint
stores — and ``TagTable.save`` streams the whole table, file rows and held rows merged, into a new file.
"""

from __future__ import annotations

import copy

import torch

from conditioner.errors import CondvecError


class RowSlots:
    """Row → slot map with growable slot storage: state tensors of shape ``(capacity, *row_shape)``.

    Slots are handed out in first-touch order; ``rows[:used]`` lists the row of every slot.
    """

    def __init__(self, num_rows: int, row_shape: tuple[int, ...], names: tuple[str, ...], device, dtype):
        self.row_shape, self.names = tuple(row_shape), names
        self.slot = torch.full((num_rows,), -1, dtype=torch.long, device=device)  # (R,) slot of each row, -1 = none
        self.rows = torch.zeros(0, dtype=torch.long, device=device)  # (capacity,) row of each slot
        self.store = {name: torch.zeros(0, *self.row_shape, device=device, dtype=dtype) for name in names}
        self.used = 0

    @property
    def device(self) -> torch.device:
        return self.slot.device

    def to(self, device) -> None:
        self.slot, self.rows = self.slot.to(device), self.rows.to(device)
        self.store = {k: v.to(device) for k, v in self.store.items()}

    def grow_rows(self, num_rows: int) -> None:
        extra = num_rows - self.slot.shape[0]
        if extra > 0:
            self.slot = torch.cat([self.slot, self.slot.new_full((extra,), -1)])

    def _reserve(self, needed: int) -> None:
        capacity = self.rows.shape[0]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity, 16)
        rows = self.rows.new_zeros(capacity)
        rows[: self.used] = self.rows[: self.used]
        self.rows = rows
        for name, old in self.store.items():
            new = old.new_zeros(capacity, *self.row_shape)
            new[: self.used] = old[: self.used]
            self.store[name] = new

    def lookup(self, rows: torch.Tensor, allocate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of ``rows`` (unique), allocating zero state for rows seen for the first time; and the new-row mask."""
        slots = self.slot[rows]
        new = slots < 0
        if allocate and bool(new.any()):
            fresh = rows[new]
            count = fresh.numel()
            self._reserve(self.used + count)
            ids = torch.arange(self.used, self.used + count, device=self.device)
            self.rows[ids] = fresh
            for tensor in self.store.values():
                tensor[ids] = 0
            self.slot[fresh] = ids
            self.used += count
            slots = self.slot[rows]
        return slots, new

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.{name}": tensor[: self.used] for name, tensor in self.store.items()}
        out[f"{prefix}.rows"] = self.rows[: self.used]
        return out

    def load(self, rows: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        """Restore slots ``0 … len(rows) - 1`` for ``rows`` in this order, with the given state."""
        device = self.device
        self.slot.fill_(-1)
        self.used = 0
        self.rows = self.rows.new_zeros(0)
        self.store = {name: tensor.new_zeros(0, *self.row_shape) for name, tensor in self.store.items()}
        self._reserve(rows.numel())
        count = rows.numel()
        rows = rows.to(device)
        self.rows[:count] = rows
        for name, tensor in tensors.items():
            self.store[name][:count] = tensor.to(device)
        self.slot[rows] = torch.arange(count, device=device)
        self.used = count


def _ids(index) -> tuple[torch.Tensor, bool]:
    """``index`` (an int, a list or a 1-D integer tensor) as a long tensor, and whether it was a single int."""
    if isinstance(index, int):
        return torch.tensor([index]), True
    if isinstance(index, slice):
        raise CondvecError("disk-backed table rows are indexed by row ids, not slices")
    ids = torch.as_tensor(index)
    if ids.dtype == torch.bool:
        ids = ids.nonzero().flatten()
    return ids.long().flatten().cpu(), False


class DiskRows:
    """``(R, *row)`` table rows: a read-only memory-mapped tensor, overlaid with the rows written since, held in fp32.

    Behaves like the row tensor where the trainer, encoding and saving use it: ``rows[ids]`` gathers (fp32),
    ``rows[ids] = values`` writes into memory (never into the file), ``append`` adds rows after the last. Held rows
    are what :meth:`held` returns and :meth:`hold` restores.

    Args:
        base (`torch.Tensor`): ``(R0, *row)`` the mapped rows (any float dtype).
        num_rows (`int`, *optional*): rows in all (``>= R0``); rows past ``R0`` must be held (:meth:`hold`).
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, base: torch.Tensor, num_rows: int | None = None):
        self.base = base
        self.stored_dtype = base.dtype
        self.row_shape = tuple(base.shape[1:])
        self._num = base.shape[0] if num_rows is None else num_rows
        self._slots = RowSlots(self._num, self.row_shape, ("value",), "cpu", torch.float32)

    # ------------------------------------------------------------------ tensor-like surface
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._num, *self.row_shape))

    def __len__(self) -> int:
        return self._num

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def numel(self) -> int:
        return self.shape.numel()

    def detach(self) -> DiskRows:
        return self

    def float(self) -> DiskRows:
        return self

    def to(self, device=None, dtype=None) -> DiskRows:
        """Only the host and fp32 are possible: the rows stay where the map is."""
        if (device is not None and torch.device(device).type != "cpu") or (dtype not in (None, torch.float32)):
            raise CondvecError("a disk-backed table stays in host memory as fp32 (training.table_device=disk): "
                               "load() the table to move it")
        return self

    def clone(self) -> DiskRows:
        """The same mapped rows with a copy of the held ones."""
        out = copy.copy(self)
        out._slots = copy.deepcopy(self._slots)
        return out

    def __deepcopy__(self, memo) -> DiskRows:
        return self.clone()

    def __getitem__(self, index) -> torch.Tensor:
        ids, single = _ids(index)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self._num):
            raise IndexError(f"row index out of range for {self._num} rows")
        out = torch.empty(ids.numel(), *self.row_shape, dtype=torch.float32)
        slots = self._slots.slot[ids]
        held = slots >= 0
        if bool(held.any()):
            out[held] = self._slots.store["value"][slots[held]]
        if not bool(held.all()):
            out[~held] = self.base[ids[~held]].float()
        return out[0] if single else out

    def __setitem__(self, index, values) -> None:
        ids, single = _ids(index)
        values = torch.as_tensor(values, dtype=torch.float32).to("cpu")
        if single:
            values = values.unsqueeze(0)
        if torch.unique(ids).numel() != ids.numel():
            raise CondvecError("disk-backed rows are written with unique row ids")
        slots, _ = self._slots.lookup(ids)
        self._slots.store["value"][slots] = values.expand(ids.numel(), *self.row_shape)

    # ------------------------------------------------------------------ rows in memory
    def append(self, rows: torch.Tensor) -> DiskRows:
        """Add ``rows`` ``(n, *row)`` after the last row (held in memory); returns these rows, grown in place."""
        start = self._num
        self._num += rows.shape[0]
        self._slots.grow_rows(self._num)
        if rows.shape[0]:
            self[torch.arange(start, self._num)] = rows
        return self

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows (U,), values (U, *row))``: every row held in memory, ascending."""
        s = self._slots
        rows, order = torch.sort(s.rows[: s.used])
        return rows, s.store["value"][: s.used][order]

    def hold(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the held rows with ``rows`` / ``values`` (what :meth:`held` gave); every appended row included."""
        rows = rows.long().cpu()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self._num):
            raise CondvecError(f"held rows out of range for {self._num} rows")
        appended = torch.arange(self.base.shape[0], self._num)
        if not bool(torch.isin(appended, rows).all()):
            raise CondvecError("rows appended after the file's last row must all be held")
        self._slots.load(rows, {"value": values.float()})

    @property
    def held_count(self) -> int:
        """How many rows are held in memory."""
        return self._slots.used

    def __repr__(self) -> str:
        return f"DiskRows({self._num} rows of {self.row_shape}, {self.held_count} held, stored {self.stored_dtype})"


class RowSparseAdamW:
    """AdamW with decoupled weight decay, applied row by row, with state only for rows that have been stepped.

    Args:
        num_rows (`int`): rows of the table (grows with :meth:`grow`).
        row_shape (`tuple[int, ...]`): shape of one row, e.g. ``(anchors, width)``.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Adam betas.
        eps (`float`, defaults to 1e-8): Adam epsilon.
        weight_decay (`float`, defaults to 0.0): decoupled weight decay, applied only to the rows stepped.
        device (`torch.device`, *optional*): where the state lives; it follows the table data at each step.
    """

    def __init__(self, num_rows: int, row_shape: tuple[int, ...], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, device: torch.device | str | None = None):
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self._slots = RowSlots(num_rows, row_shape, ("exp_avg", "exp_avg_sq"), device, torch.float32)
        self.steps = torch.zeros(num_rows, dtype=torch.long, device=device)  # (R,) per-row step count

    @property
    def allocated_rows(self) -> int:
        """How many rows hold optimiser state (rows stepped at least once)."""
        return self._slots.used

    @property
    def exp_avg(self) -> torch.Tensor:
        """First moments of every row as a dense ``(R, *row_shape)`` tensor (zeros where never stepped); O(table)."""
        return self._dense("exp_avg")

    @property
    def exp_avg_sq(self) -> torch.Tensor:
        """Second moments of every row as a dense ``(R, *row_shape)`` tensor (zeros where never stepped); O(table)."""
        return self._dense("exp_avg_sq")

    def _dense(self, name: str) -> torch.Tensor:
        s = self._slots
        out = s.store[name].new_zeros(s.slot.shape[0], *s.row_shape)
        out[s.rows[: s.used]] = s.store[name][: s.used]
        return out

    def grow(self, num_rows: int) -> None:
        """Make room for rows appended to the table (no memory is allocated until they are stepped)."""
        self._slots.grow_rows(num_rows)
        extra = num_rows - self.steps.shape[0]
        if extra > 0:
            self.steps = torch.cat([self.steps, self.steps.new_zeros(extra)])

    @torch.no_grad()
    def step(self, data: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """Update ``data[rows]`` in place from ``grad`` (one gradient per listed row).

        ``rows`` and ``grad`` may live on another device than ``data`` (a host-resident table trained on an
        accelerator): they are moved to the data's device, where the state lives too.

        Args:
            data (`torch.Tensor`): ``(R, A, W)`` the table rows.
            rows (`torch.LongTensor`): ``(K,)`` unique rows to update.
            grad (`torch.Tensor`): ``(K, A, W)`` their gradients.
            lr (`float`): learning rate of this step.
        """
        if rows.numel() == 0:
            return
        device = data.device
        if self.steps.device != device:
            self.steps = self.steps.to(device)
            self._slots.to(device)
        rows, grad = rows.to(device), grad.to(device=device, dtype=torch.float32)
        beta1, beta2 = self.betas
        slots, _ = self._slots.lookup(rows)  # (K,) state allocated on first touch (zeros)
        steps = self.steps[rows] + 1  # (K,)
        self.steps[rows] = steps
        store = self._slots.store
        m = store["exp_avg"][slots].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = store["exp_avg_sq"][slots].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        store["exp_avg"][slots] = m
        store["exp_avg_sq"][slots] = v
        shape = (-1,) + (1,) * (grad.dim() - 1)
        bias1 = (1 - beta1 ** steps.to(torch.float64)).to(grad.dtype).view(shape)
        bias2 = (1 - beta2 ** steps.to(torch.float64)).to(grad.dtype).view(shape)
        p = data[rows].float()
        if self.weight_decay:
            p.mul_(1 - lr * self.weight_decay)
        p.addcdiv_(m / bias1, (v / bias2).sqrt_().add_(self.eps), value=-lr)
        data[rows] = p.to(data.dtype)

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state as named tensors, for a safetensors checkpoint.

        ``PREFIX.rows`` ``(U,)`` lists the rows holding state, in slot order; ``PREFIX.exp_avg`` and
        ``PREFIX.exp_avg_sq`` ``(U, *row_shape)`` their moments; ``PREFIX.steps`` ``(R,)`` every row's step count.
        """
        return self._slots.state_tensors(prefix) | {f"{prefix}.steps": self.steps}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Restore what :meth:`state_tensors` gave (or a dense state without ``PREFIX.rows``)."""
        self.steps = tensors[f"{prefix}.steps"].clone().to(self.steps.device)
        self._slots.grow_rows(self.steps.shape[0])
        moments = {name: tensors[f"{prefix}.{name}"] for name in ("exp_avg", "exp_avg_sq")}
        rows = tensors.get(f"{prefix}.rows")
        if rows is None:  # dense: every row has moments; keep those of rows stepped at least once
            rows = torch.nonzero(tensors[f"{prefix}.steps"] > 0).flatten()
            moments = {name: tensor[rows.to(tensor.device)] for name, tensor in moments.items()}
        self._slots.load(rows, moments)
