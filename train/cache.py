"""Caches of training inputs: VAE latents on disk (:class:`LatentCache`) or pixels in memory (:class:`PixelCache`).

Latent cache layout::

    CACHE_DIR/<vae identity>/<bucket width>x<bucket height>/<key>.safetensors   one tensor "latent": (C, h/f, w/f)

The VAE identity (:func:`vae_identity`) hashes the VAE's config and encoder weights, so another VAE never reads
these latents. The key hashes the image's absolute path, file size, modification time and the flip flag: an edited
image gets a new key and is encoded again, and its stale entry is simply never read. Entries are written to a
temporary file and renamed into place, so a crash never leaves a half-written entry, and several processes may fill
the same cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from conditioner.errors import CondvecError
from train.data import Item, _load_uint8, _to_float, load_image
from train.model import diffusers_config

# Bump when the stored latents change meaning (image preprocessing, what is encoded): old entries are then unused.
_CACHE_FORMAT = "condvec-latents-v1"
# Weights that only decode: a VAE whose decoder alone was fine-tuned (sd-vae-ft-mse) encodes identically.
_DECODE_ONLY_PREFIXES = ("decoder.", "post_quant_conv.")


def vae_identity(vae) -> str:
    """A short hash that changes whenever the VAE would encode an image differently.

    It covers the VAE class, its config (without bookkeeping keys such as ``_name_or_path``) and the exact bytes,
    dtype and shape of every weight that takes part in encoding (decoder-only weights are left out).

    Args:
        vae (`diffusers.AutoencoderKL`): the VAE.

    Returns:
        `str`: 16 hexadecimal characters.
    """
    digest = hashlib.sha256()
    digest.update(_CACHE_FORMAT.encode())
    digest.update(type(vae).__name__.encode())
    config = diffusers_config(vae)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(_DECODE_ONLY_PREFIXES):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\0{name}:{flat.dtype}:{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _file_key(item: Item) -> str:
    """Path, size and mtime of the image file; a changed file gives a new key."""
    try:
        stat = os.stat(item.path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image {item.path} no longer exists; scan the dataset again") from err
    return f"{os.path.abspath(item.path)}\0{stat.st_size}\0{stat.st_mtime_ns}"


class LatentEncoder:
    """VAE latents of the training images, encoded whenever asked and never stored (``data.cache_latents=false``).

    The VAE is moved to ``device`` and ``dtype``; it encodes without gradients, and the latent of an image is the
    mean of its latent distribution times ``vae.config.scaling_factor``.

    Args:
        vae (`diffusers.AutoencoderKL`): the VAE.
        device (`str` or `torch.device`, defaults to `"cpu"`): where to encode.
        dtype (`torch.dtype`, defaults to `torch.float32`): the VAE's dtype while encoding, and the latents' dtype.
    """

    def __init__(self, vae, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if vae.dtype != dtype:
            vae = vae.to(dtype=dtype)
        self.vae = vae.to(device)
        self.device = torch.device(device)
        self.dtype = dtype

    def _encode(self, items: list[Item], flips: list[bool]) -> list[torch.Tensor]:
        pixels = torch.stack([load_image(item, flip) for item, flip in zip(items, flips)])  # (B, 3, h, w)
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor  # (B, C, h/f, w/f)
        # Clones, so that no entry keeps the whole batch's storage alive.
        return [latent.to("cpu").clone() for latent in latents]

    def get(self, item: Item, flip: bool = False) -> torch.Tensor:
        """The latent of one image, encoded now: ``(C, bucket height / f, bucket width / f)`` on the CPU."""
        return self._encode([item], [flip])[0]


class LatentCache(LatentEncoder):
    """VAE latents of the training images, stored on disk as safetensors and kept in memory once read.

    Encoding as in :class:`LatentEncoder`.

    Args:
        vae (`diffusers.AutoencoderKL`): the VAE.
        cache_dir (`str`): the cache folder; latents go to ``cache_dir/<vae_identity(vae)>/...``.
        device (`str` or `torch.device`, defaults to `"cpu"`): where to encode.
        dtype (`torch.dtype`, defaults to `torch.float32`): the VAE's dtype while encoding, and the latents' dtype.
    """

    def __init__(self, vae, cache_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(vae, device, dtype)
        self.identity = vae_identity(self.vae)
        self.folder = Path(cache_dir) / self.identity
        self._memory: dict[Path, torch.Tensor] = {}

    def _entry_path(self, item: Item, flip: bool) -> Path:
        key = hashlib.sha256(f"{_CACHE_FORMAT}\0{_file_key(item)}\0flip={int(flip)}".encode()).hexdigest()[:32]
        width, height = item.bucket
        return self.folder / f"{width}x{height}" / f"{key}.safetensors"

    def _write(self, path: Path, latent: torch.Tensor, item: Item, flip: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            metadata = {"image": item.path, "flip": str(flip)}
            save_file({"latent": latent.contiguous()}, str(temporary), metadata=metadata)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    def _read(self, path: Path) -> torch.Tensor | None:
        """The stored latent, or `None` when the entry is missing or unreadable (it is then encoded again)."""
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["latent"]
        except (OSError, SafetensorError, KeyError):
            return None

    def get(self, item: Item, flip: bool = False) -> torch.Tensor:
        """The latent of one image: from memory, else from disk, else encoded now (and stored).

        Args:
            item (`Item`): the image, with its bucket set.
            flip (`bool`, defaults to `False`): the latent of the left-right mirrored image.

        Returns:
            `torch.Tensor`: shape ``(C, bucket height / f, bucket width / f)`` on the CPU, ``f`` being the VAE's
            downsampling factor. It is shared with the cache: do not modify it in place.
        """
        path = self._entry_path(item, flip)
        latent = self._memory.get(path)
        if latent is None:
            latent = self._read(path)
            if latent is None:
                latent = self._encode([item], [flip])[0]
                self._write(path, latent, item, flip)
            self._memory[path] = latent
        return latent

    def prepare(self, items: list[Item], flips: bool, progress: bool = True, batch_size: int = 8) -> int:
        """Encode and store every entry that is not on disk yet.

        Entries are only written to disk here; they reach memory when :meth:`get` first reads them.

        Args:
            items (`list[Item]`): the images, with buckets set.
            flips (`bool`): also encode each image mirrored left-right.
            progress (`bool`, defaults to `True`): show a progress bar.
            batch_size (`int`, defaults to 8): images per VAE call (images of one bucket are batched together).

        Returns:
            `int`: how many entries were encoded.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CondvecError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        missing: dict[Path, tuple[Item, bool]] = {}
        for item in items:
            for flip in (False, True) if flips else (False,):
                path = self._entry_path(item, flip)
                if path not in missing and path not in self._memory and not path.is_file():
                    missing[path] = (item, flip)
        by_bucket: dict[tuple[int, int], list[tuple[Path, Item, bool]]] = {}
        for path, (item, flip) in missing.items():
            by_bucket.setdefault(tuple(item.bucket), []).append((path, item, flip))
        with tqdm(total=len(missing), desc="caching latents", unit="image", disable=not progress) as bar:
            for entries in by_bucket.values():
                for start in range(0, len(entries), batch_size):
                    chunk = entries[start : start + batch_size]
                    latents = self._encode([item for _, item, _ in chunk], [flip for _, _, flip in chunk])
                    for (path, item, flip), latent in zip(chunk, latents):
                        self._write(path, latent, item, flip)
                    bar.update(len(chunk))
        return len(missing)


class PixelCache:
    """Training images at their bucket size, kept in memory, for models that train in pixel space (no VAE).

    Images are stored once, unflipped, as uint8 (a quarter of the float size); :meth:`get` makes the flipped float
    view on the fly, equal to :func:`train.data.load_image`. An edited image file (new size or mtime) is loaded
    again.

    Args:
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the returned tensors.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self._memory: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}

    def _key(self, item: Item) -> tuple[str, tuple[int, int]]:
        return _file_key(item), tuple(item.bucket)

    def get(self, item: Item, flip: bool = False) -> torch.Tensor:
        """One image, as :func:`train.data.load_image` returns it.

        Args:
            item (`Item`): the image, with its bucket set.
            flip (`bool`, defaults to `False`): mirror the image left-right.

        Returns:
            `torch.Tensor`: shape ``(3, bucket height, bucket width)``, values in ``[-1, 1]``; a new tensor.
        """
        key = self._key(item)
        pixels = self._memory.get(key)
        if pixels is None:
            pixels = self._memory[key] = _load_uint8(item)  # (3, h, w) uint8
        return _to_float(pixels, flip).to(self.dtype)  # (3, h, w)

    def prepare(self, items: list[Item], flips: bool, progress: bool = True) -> int:
        """Load every image that is not in memory yet.

        Args:
            items (`list[Item]`): the images, with buckets set.
            flips (`bool`): accepted for the same interface as :meth:`LatentCache.prepare`; flipped images need no
                extra memory, they are made by :meth:`get`.
            progress (`bool`, defaults to `True`): show a progress bar.

        Returns:
            `int`: how many images were loaded.
        """
        missing: dict[tuple[str, tuple[int, int]], Item] = {}
        for item in items:
            key = self._key(item)
            if key not in self._memory:
                missing.setdefault(key, item)
        for key, item in tqdm(missing.items(), desc="loading images", unit="image", disable=not progress):
            self._memory[key] = _load_uint8(item)
        return len(missing)
