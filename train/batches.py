"""What each sample of a micro-step gets: its image, caption tags after dropout, timestep, flip and noise.

Every random choice is drawn from a generator seeded by ``(seed, micro_step, position in the global batch)``. A
sample therefore gets the same randomness whatever the number of processes and whether the run was resumed, and a
resumed run needs no RNG state to continue bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conditioner.parse import Tag, normalize_tag
from train.data import Item, epoch_batches

_MIX = (6364136223846793005, 1442695040888963407, 2862933555777620809)


def sample_generator(seed: int, micro_step: int, position: int) -> torch.Generator:
    """The generator of one sample's randomness; depends only on its seed, micro-step and batch position."""
    value = (seed * _MIX[0] + micro_step * _MIX[1] + position * _MIX[2] + 12345) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


@dataclass
class Plan:
    """One sample of a micro-step: the item index, its tags after dropout, timestep, flip and noise generator."""

    index: int
    tags: list[Tag]
    timestep: int
    flip: bool
    generator: torch.Generator

    def noise(self, shape: torch.Size, offset: float) -> torch.Tensor:
        """The sample's noise ``(C, H, W)``, plus ``offset`` × a per-channel constant when ``offset`` is set."""
        noise = torch.randn(shape, generator=self.generator)
        if offset:
            noise = noise + offset * torch.randn(shape[0], generator=self.generator)[:, None, None]
        return noise


class Planner:
    """Plans of every micro-step: which items form its global batch (epoch-shuffled) and their randomness.

    Args:
        items (`list[Item]`): the dataset.
        captions (`list[list[Tag]]`): parsed caption of each item.
        data_cfg (`DictConfig`): the ``data`` section (dropouts, flip, ``keep_tags``; an item's ``keep`` first tags
            are never dropped either).
        batch_size (`int`): the global batch.
        seed (`int`): the run's seed.
        num_train_timesteps (`int`): timesteps are drawn from ``[0, num_train_timesteps)``.
    """

    def __init__(self, items: list[Item], captions: list[list[Tag]], data_cfg, batch_size: int, seed: int,
                 num_train_timesteps: int):
        self.items, self.captions, self.data = items, captions, data_cfg
        self.batch_size, self.seed, self.num_t = batch_size, seed, num_train_timesteps
        keep = data_cfg.keep_tags
        self.keep_first = keep if isinstance(keep, int) else 0
        self.keep_names = set() if isinstance(keep, int) else {normalize_tag(str(name)) for name in keep}
        self._epochs = {0: epoch_batches(items, batch_size, seed, 0)}  # epoch 0 (for its length) and the current

    def _global_batch(self, micro_step: int) -> list[int]:
        epoch, position = divmod(micro_step, len(self._epochs[0]))  # every epoch has as many batches as epoch 0
        if epoch not in self._epochs:
            self._epochs = {0: self._epochs[0], epoch: epoch_batches(self.items, self.batch_size, self.seed, epoch)}
        return self._epochs[epoch][position]

    def plan(self, micro_step: int) -> list[Plan]:
        """The plans of micro-step ``micro_step``, one per sample of the global batch."""
        d = self.data
        plans = []
        for position, index in enumerate(self._global_batch(micro_step)):
            gen = sample_generator(self.seed, micro_step, position)
            tags = self.captions[index]
            if torch.rand((), generator=gen).item() < d.caption_dropout:
                tags = []
            elif d.tag_dropout > 0 and tags:
                keep = torch.rand(len(tags), generator=gen) >= d.tag_dropout
                always = max(self.items[index].keep, self.keep_first)
                tags = [t for i, (t, k) in enumerate(zip(tags, keep.tolist()))
                        if k or i < always or t.name in self.keep_names]
            timestep = int(torch.randint(0, self.num_t, (), generator=gen))
            flip = bool(d.flip and torch.rand((), generator=gen).item() < 0.5)
            plans.append(Plan(index, tags, timestep, flip, gen))
        return plans
