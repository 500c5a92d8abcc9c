"""Factorised per-layer rows: a tag's per-group vectors as its own shared vector plus its own rank-r offsets.

A ``layers`` row of a vector table holds one ``D``-wide vector per group, ``G × D`` numbers (SDXL: 70 × 2048). A
factorised row stores, per tag and anchor, the mean over groups ``s`` (``D``), and the groups' offsets from it as
``coef @ basis`` with ``coef`` ``(G, r)`` and ``basis`` ``(r, D)``: ``D·(1 + r) + G·r`` numbers, about ``1 + r``
vectors (SDXL at rank 3: 8,402 numbers instead of 143,360). Everything is per tag: no basis is shared between tags,
so rows stay independent — training one tag leaves every other tag's bytes unchanged, as with full rows.

``FactorRows`` stands in for the table's ``(R, A, G·D)`` row tensor: gathering ``rows[ids]`` rebuilds the full rows
(exactly, from the factors), so encoding, generation and every read work unchanged; writing full rows
(``rows[ids] = values``: a blend, a swap, a new tag's initial rows) stores their best rank-r approximation (a
truncated SVD of the offsets — exact when the offsets have rank ≤ r, as a bootstrapped or zero row's have); copying
factorised rows between tables (``rows[ids] = other.take(…)``) copies the factors exactly. The trainer learns
``shared``, ``coef`` and ``basis`` themselves, row-sparsely, each at its own scale of the learning rate
(:func:`factor_lr_scales`).

``factorise(table, rank)`` converts a full table (truncated SVD, the relative error reported); ``unfactorise`` gives
the full table back exactly.
"""

from __future__ import annotations

import torch

from conditioner.errors import CondvecError

FACTORS = ("shared", "coef", "basis")


def factor_lr_scales(dim: int, rank: int) -> dict[str, float]:
    """Learning-rate multipliers of the factors, so that one Adam step moves a factorised row about as much as it
    moves a full row: Adam steps every number by about ``lr``; the ``basis`` rows are unit vectors (numbers of size
    ``1/√dim``); an offset sums ``rank`` coefficient steps along them, so ``coef`` steps ``lr·√(dim/rank)``.
    Measured in BENCHMARKS.md ("Factorised per-layer rows"): one shared learning rate made higher ranks learn worse."""
    return {"shared": 1.0, "coef": (dim / rank) ** 0.5, "basis": dim ** -0.5}


def _ids(index) -> tuple[torch.Tensor | slice, bool]:
    if isinstance(index, int):
        return torch.tensor([index]), True
    if isinstance(index, slice):
        return index, False
    ids = torch.as_tensor(index)
    if ids.dtype == torch.bool:
        ids = ids.nonzero().flatten()
    return ids.long().flatten(), False


def compose(shared: torch.Tensor, coef: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Full rows ``(K, A, G·D)`` from factors ``(K, A, D)``, ``(K, A, G, r)``, ``(K, A, r, D)`` (differentiable)."""
    rows = shared.unsqueeze(2) + coef @ basis  # (K, A, G, D)
    return rows.flatten(2)


def decompose(rows: torch.Tensor, groups: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Factors of full rows ``(K, A, G·D)``: the group mean, and the offsets' truncated SVD at ``rank``.

    Directions the offsets do not have (a row whose groups are all alike: bootstrapped, zeros) get seeded random
    orthonormal basis vectors with zero coefficients, so training has somewhere to go; the rebuilt row is the same.
    """
    k, a, width = rows.shape
    dim = width // groups
    x = rows.double().reshape(k, a, groups, dim)
    shared = x.mean(2)  # (K, A, D)
    offsets = x - shared.unsqueeze(2)  # (K, A, G, D)
    u, s, vh = torch.linalg.svd(offsets, full_matrices=False)  # (K, A, G, m), (K, A, m), (K, A, m, D)
    m = s.shape[-1]
    keep = min(rank, m)
    coef = torch.zeros(k, a, groups, rank, dtype=torch.float64)
    basis = torch.zeros(k, a, rank, dim, dtype=torch.float64)
    coef[..., :keep] = u[..., :keep] * s[..., None, :keep]
    basis[..., :keep, :] = vh[..., :keep, :]
    scale = x.flatten(2).abs().amax(-1).clamp_min(1.0)  # (K, A)
    weak = s[..., :keep] <= 1e-9 * scale.unsqueeze(-1) if keep else torch.zeros(k, a, 0, dtype=torch.bool)
    if rank > keep or bool(weak.any()):
        gen = torch.Generator().manual_seed(seed)
        for i in range(k):
            for j in range(a):
                fill = list(range(keep, rank)) + weak[i, j].nonzero().flatten().tolist()
                if not fill:
                    continue
                strong = [c for c in range(keep) if not bool(weak[i, j, c])]
                found = basis[i, j, strong]  # (n, D) orthonormal
                extra = torch.randn(len(fill), dim, generator=gen, dtype=torch.float64)
                extra -= (extra @ found.T) @ found if len(strong) else 0
                q, _ = torch.linalg.qr(extra.T)  # (D, len(fill))
                basis[i, j, fill] = q.T[: len(fill)]
                coef[i, j, :, fill] = 0.0
    return shared.float(), coef.float(), basis.float()


class FactorRows:
    """``(R, A, G·D)`` rows stored as per-tag factors ``shared`` ``(R, A, D)``, ``coef`` ``(R, A, G, r)`` and
    ``basis`` ``(R, A, r, D)``; behaves like the row tensor where tables use it (see the module docstring)."""

    def __init__(self, shared: torch.Tensor, coef: torch.Tensor, basis: torch.Tensor):
        if shared.dim() != 3 or coef.dim() != 4 or basis.dim() != 4 or coef.shape[:2] != shared.shape[:2] \
                or basis.shape[:2] != shared.shape[:2] or coef.shape[3] != basis.shape[2] \
                or basis.shape[3] != shared.shape[2]:
            raise CondvecError(f"factorised rows have inconsistent shapes: shared {tuple(shared.shape)}, coef "
                               f"{tuple(coef.shape)}, basis {tuple(basis.shape)}")
        self.shared, self.coef, self.basis = shared, coef, basis

    @classmethod
    def empty(cls, anchors: int, groups: int, dim: int, rank: int, dtype=torch.float32) -> FactorRows:
        return cls(torch.zeros(0, anchors, dim, dtype=dtype), torch.zeros(0, anchors, groups, rank, dtype=dtype),
                   torch.zeros(0, anchors, rank, dim, dtype=dtype))

    # ------------------------------------------------------------------ layout
    @property
    def rank(self) -> int:
        return self.coef.shape[3]

    @property
    def groups(self) -> int:
        return self.coef.shape[2]

    @property
    def shape(self) -> torch.Size:
        r, a, d = self.shared.shape
        return torch.Size((r, a, self.groups * d))

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.dtype

    @property
    def device(self) -> torch.device:
        return self.shared.device

    def factors(self) -> dict[str, torch.Tensor]:
        """``{"shared": …, "coef": …, "basis": …}``."""
        return {name: getattr(self, name) for name in FACTORS}

    def __len__(self) -> int:
        return self.shared.shape[0]

    def dim(self) -> int:
        return 3

    def numel(self) -> int:
        """Numbers stored (not those of the full rows)."""
        return sum(t.numel() for t in self.factors().values())

    def detach(self) -> FactorRows:
        return FactorRows(*(t.detach() for t in self.factors().values()))

    def clone(self) -> FactorRows:
        return FactorRows(*(t.clone() for t in self.factors().values()))

    def __deepcopy__(self, memo) -> FactorRows:
        return self.clone()

    def to(self, device=None, dtype=None) -> FactorRows:
        return FactorRows(*(t.to(device=device, dtype=dtype) for t in self.factors().values()))

    def float(self) -> FactorRows:
        return self.to(dtype=torch.float32)

    # ------------------------------------------------------------------ rows
    def __getitem__(self, index) -> torch.Tensor:
        """Full rows, rebuilt from the factors."""
        ids, single = _ids(index)
        rows = compose(self.shared[ids], self.coef[ids], self.basis[ids])
        return rows[0] if single else rows

    def take(self, index) -> FactorRows:
        """The factors of rows ``index``, as their own ``FactorRows`` (exact)."""
        ids, _ = _ids(index)
        return FactorRows(*(t[ids] for t in self.factors().values()))

    def __setitem__(self, index, values) -> None:
        """Write rows: factors are copied exactly; full rows are stored as their best rank-r approximation."""
        ids, single = _ids(index)
        if not isinstance(values, FactorRows):
            values = torch.as_tensor(values)
            if single:
                values = values.unsqueeze(0)
            count = len(range(len(self))[ids]) if isinstance(ids, slice) else ids.numel()
            values = values.expand(count, *self.shape[1:])
            values = FactorRows(*decompose(values.detach().float().cpu(), self.groups, self.rank))
        for name in FACTORS:
            getattr(self, name)[ids] = getattr(values, name).to(device=self.device, dtype=self.dtype)

    def append(self, rows) -> FactorRows:
        """These rows and ``rows`` (full rows, factorised here, or ``FactorRows``) after them, as a new object."""
        if not isinstance(rows, FactorRows):
            rows = FactorRows(*decompose(rows.detach().float().cpu(), self.groups, self.rank, seed=len(self)))
        return FactorRows(*(torch.cat([getattr(self, n), getattr(rows, n).to(device=self.device, dtype=self.dtype)])
                            for n in FACTORS))

    def __repr__(self) -> str:
        return f"FactorRows({len(self)} rows, {self.groups} groups, rank {self.rank})"


def take_rows(data, index):
    """Rows ``index`` of a row tensor or ``FactorRows``, keeping the representation (factors stay factors)."""
    return data.take(index) if isinstance(data, FactorRows) else data[index].clone()


def factorise(table, rank: int):
    """A copy of vector ``table`` with factorised rows at ``rank`` (truncated SVD); returns ``(table, rel_error)``.

    ``rel_error`` is ``‖full − rebuilt‖ / ‖full‖`` over every tag row (0 when every row's group offsets have rank ≤
    ``rank``). Raises ``CondvecError`` for kv tables, single-group tables and ranks outside ``[1, groups − 1]``.
    """
    groups = len(table.group_names)
    if table.mode_spec.direct_kv:
        raise CondvecError("key/value tables cannot be factorised: their rows are each layer's own K and V")
    if groups < 2:
        raise CondvecError("a single-group table is one vector per tag already: nothing to factorise")
    if not 1 <= rank <= groups - 1:
        raise CondvecError(f"rank must be in [1, {groups - 1}] for {groups} groups (rank {groups - 1} is exact), "
                           f"got {rank}")
    if isinstance(table.data, FactorRows):
        raise CondvecError(f"the table is factorised already (rank {table.data.rank}): unfactorise it first")
    full = table.data.float()
    rows = FactorRows.empty(table.num_anchors, groups, table.dim, rank)
    chunk = 1024
    for start in range(0, full.shape[0], chunk):
        rows = rows.append(full[start:start + chunk])
    out = table.copy()
    out.data = rows
    rebuilt = rows[torch.arange(len(rows))] if len(rows) else full
    error = float((full - rebuilt).norm() / full.norm().clamp_min(1e-30)) if len(rows) else 0.0
    out.provenance = [*out.provenance, {"op": "factorise", "rank": rank, "rel_error": error}]
    return out, error


def unfactorise(table):
    """A copy of ``table`` with full rows, rebuilt exactly from its factors."""
    if not isinstance(table.data, FactorRows):
        raise CondvecError("the table is not factorised")
    out = table.copy()
    out.data = table.data[torch.arange(len(table.data))] if len(table.data) else torch.zeros(0, *table.data.shape[1:])
    out.provenance = [*out.provenance, {"op": "unfactorise", "rank": table.data.rank}]
    return out
