"""``TagDiffusionPipeline``: text-to-image from tag prompts, no text encoder."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable

import diffusers
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from conditioner.encode import Rows, encode_pooled, pack, tokenize
from conditioner.errors import CondvecError
from conditioner.table import TagTable
from unet_patch.discover import takes_pooled
from unet_patch.load import TABLE_FILE, load_model
from unet_patch.patch import patched
from unet_patch.processor import cached_kv


def check_device(device: str) -> None:
    """Raise ``CondvecError`` in one line if torch cannot use ``device`` here (``cuda`` on a CPU build, a typo)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise CondvecError(f"--device {device!r} is not a torch device ({str(err).splitlines()[0]}); "
                           "use cpu, cuda, cuda:1 or mps") from err
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        raise CondvecError(f"--device {device!r}: this torch build ({torch.__version__}) has no usable {dev.type} "
                           "device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CondvecError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")


def vae_scale_factor(vae: AutoencoderKL | None) -> int:
    """How many image pixels one latent pixel covers (1 in pixel space, 8 for SD's VAE)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


class AnchorCallback:
    """Timestep anchors in a stock diffusers pipeline: re-encodes the prompts for each step's timestep.

    Stock pipelines encode once; a table with timestep anchors needs the conditioning of every step's timestep. Pass
    this as ``callback_on_step_end`` (with ``callback_on_step_end_tensor_inputs=callback.tensor_inputs``): after each
    step it hands the pipeline the conditioning for the next timestep, ``[negative, positive]`` when the pipeline
    runs classifier-free guidance. The first step's conditioning comes from :meth:`embeds`.

    Args:
        table (`TagTable`): the table (installed on the pipeline's UNet).
        prompt (`str | list[str]`): tag prompts.
        negative_prompt (`str | list[str]`, defaults to `""`): negative prompts (one, or one per prompt).

    Example:
        ```py
        >>> callback = AnchorCallback(table, "red circle, large circle")
        >>> pipe.scheduler.set_timesteps(30)
        >>> image = pipe(**callback.embeds(pipe.scheduler.timesteps[0]), num_inference_steps=30,
        ...              callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs)
        ```
    """

    tensor_inputs = ["prompt_embeds"]

    def __init__(self, table: TagTable, prompt: str | list[str], negative_prompt: str | list[str] = ""):
        self.table = table
        self.prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        self.negatives = negatives * len(self.prompts) if len(negatives) == 1 else negatives
        self.tokens = tokenize(table, self.negatives + self.prompts)
        self.rows = Rows.from_table(table, self.tokens.rows)

    def _both(self, timestep) -> torch.Tensor:
        return pack(self.table, self.tokens, float(timestep), rows=self.rows)  # (2B, N, W): negatives, prompts

    def embeds(self, timestep) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` and ``negative_prompt_embeds`` at one timestep (for the pipeline's first step)."""
        negative, positive = self._both(timestep).chunk(2)
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        timesteps = pipe.scheduler.timesteps
        if step + 1 >= len(timesteps):
            return {}
        current = callback_kwargs["prompt_embeds"]
        both = self._both(timesteps[step + 1]).to(current)
        return {"prompt_embeds": both if current.shape[0] == both.shape[0] else both.chunk(2)[1]}


class TagDiffusionPipeline(DiffusionPipeline):
    """Generate images from tag prompts with a stock diffusers UNet and a condvec table.

    Args:
        unet (`UNet2DConditionModel`): the denoiser; its attn2 processors are swapped only while generating.
        scheduler (`SchedulerMixin`): any diffusers scheduler (DDIM, Euler, DPM-Solver …).
        vae (`AutoencoderKL`, *optional*): decodes latents; `None` means the UNet works in pixel space.
        table (`TagTable`): the tag table.

    Example:
        ```py
        >>> pipe = TagDiffusionPipeline(unet=unet, scheduler=DDIMScheduler(), vae=None, table=table)
        >>> image = pipe("red circle, white background", num_inference_steps=20, guidance_scale=3.0).images[0]
        ```
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet: UNet2DConditionModel, scheduler, vae: AutoencoderKL | None = None,
                 table: TagTable | None = None):
        super().__init__()
        if table is None:
            raise CondvecError("TagDiffusionPipeline needs a table (TagTable.load(path) or unet_patch.table_for_unet)")
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.table = table

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    @property
    def is_sdxl(self) -> bool:
        """Whether the UNet takes SDXL's pooled text embeddings and time ids (``addition_embed_type: text_time``)."""
        return takes_pooled(self.unet)

    def _step_kwargs(self, generator, eta: float) -> dict:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in params:
            kwargs["generator"] = generator
        if "eta" in params:
            kwargs["eta"] = eta
        return kwargs

    def _added_cond(self, prompts: list[str], negatives: list[str], zero_negative: bool, do_cfg: bool,
                    height: int, width: int, original_size, crops_coords_top_left, target_size, lenient: bool):
        """SDXL's ``added_cond_kwargs``: pooled vectors from the table and time ids from the image geometry."""
        table = self.table
        if table.pooled is None:
            raise CondvecError("this UNet is SDXL-family (it needs pooled text embeddings) but the table has no "
                               "pooled "
                               "vectors: bootstrap the table from the SDXL model (condvec-bootstrap)")
        pooled = encode_pooled(table, prompts, lenient=lenient)  # (B, P)
        time_ids = torch.tensor([list(original_size or (height, width)) + list(crops_coords_top_left)
                                 + list(target_size or (height, width))], dtype=pooled.dtype)  # (1, 6)
        time_ids = time_ids.expand(len(prompts), -1)
        if do_cfg:
            negative = torch.zeros_like(pooled) if zero_negative else encode_pooled(table, negatives, lenient=lenient)
            pooled = torch.cat([negative, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        device, dtype = self.unet.device, self.unet.dtype
        expected = self.unet.add_embedding.linear_1.in_features - pooled.shape[1]
        if time_ids.shape[1] * self.unet.config.addition_time_embed_dim != expected:
            raise CondvecError(f"the table's pooled vectors have width {pooled.shape[1]}, which does not fit this "
                               "UNet's add_embedding: use a table bootstrapped from this model")
        return {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}

    def _initial_latents(self, image, strength: float, shape, generator, device, dtype, num_inference_steps: int):
        """Timesteps to run and the starting latents: pure noise, or (img2img) the image noised to ``strength``."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if image is None:
            return timesteps, noise * self.scheduler.init_noise_sigma
        if not 0.0 < strength <= 1.0:
            raise CondvecError(f"strength must be in (0, 1], got {strength}")
        # as diffusers' img2img pipelines: skip the first (1 - strength) of the schedule
        keep = min(int(num_inference_steps * strength), num_inference_steps)
        start = max(num_inference_steps - keep, 0) * self.scheduler.order
        timesteps = timesteps[start:]
        if len(timesteps) == 0:
            raise CondvecError(f"strength {strength} with {num_inference_steps} steps leaves no step to run")
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        scale = self.vae_scale_factor
        pixels = VaeImageProcessor(vae_scale_factor=scale).preprocess(image, height=shape[2] * scale,
                                                                      width=shape[3] * scale)
        pixels = pixels.to(device=device, dtype=dtype)
        if self.vae is not None:
            latent_dist = self.vae.encode(pixels).latent_dist
            init = latent_dist.sample(generator) * self.vae.config.scaling_factor
        else:
            init = pixels
        if shape[0] % init.shape[0]:
            raise CondvecError(f"got {init.shape[0]} start images for {shape[0]} outputs: give one, or one per output")
        init = init.expand(shape[0], -1, -1, -1) if init.shape[0] == 1 else init.repeat_interleave(
            shape[0] // init.shape[0], 0)
        return timesteps, self.scheduler.add_noise(init, noise, timesteps[:1].repeat(shape[0]))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        eta: float = 0.0,
        lenient: bool = False,
        return_dict: bool = True,
        image=None,
        strength: float = 0.8,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ):
        """Generate images (text-to-image, or image-to-image with ``image=``).

        Args:
            prompt (`str | list[str]`): comma-separated tags per image, e.g. ``"red circle, (large circle:1.3)"``.
            negative_prompt (`str | list[str]`, *optional*): tags to steer away from; default is the null prompt
                (zeros instead where the base model's pipeline forces zeros for an empty negative prompt, as
                SDXL's ``force_zeros_for_empty_prompt``; the table records it).
            num_inference_steps (`int`, defaults to 30): denoising steps (img2img runs ``strength`` of them).
            guidance_scale (`float`, defaults to 5.0): classifier-free guidance; ≤ 1 disables it.
            guidance_rescale (`float`, defaults to 0.0): rescale the guided prediction's standard deviation towards
                the conditional one (Lin et al., 2023, §3.4; 0.7 is their value): counters over-exposure with large
                guidance on zero-terminal-SNR models. 0 disables it.
            height (`int`, *optional*): image height; defaults to the UNet's sample size × the VAE's scale.
            width (`int`, *optional*): image width; same default.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            generator (`torch.Generator`, *optional*): for reproducible noise.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end (`Callable`, *optional*): called as ``fn(pipe, step, timestep, {"latents": ...})``
                after every step; may return a dict with replacement ``latents``.
            eta (`float`, defaults to 0.0): DDIM's eta (ignored by schedulers without it).
            lenient (`bool`, defaults to `False`): skip unknown tags with a warning instead of raising.
            return_dict (`bool`, defaults to `True`): return an ``ImagePipelineOutput`` rather than a tuple.
            image (`PIL.Image | torch.Tensor | list`, *optional*): start image(s) for image-to-image.
            strength (`float`, defaults to 0.8): img2img: how much of the schedule to run (1 = ignore the image).
            original_size (`tuple[int, int]`, *optional*): SDXL micro-conditioning; defaults to ``(height, width)``.
            crops_coords_top_left (`tuple[int, int]`, defaults to `(0, 0)`): SDXL micro-conditioning.
            target_size (`tuple[int, int]`, *optional*): SDXL micro-conditioning; defaults to ``(height, width)``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        zero_negative = negative_prompt is None and self.table.negative_zeros
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise CondvecError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        if num_images_per_prompt < 1:
            raise CondvecError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise CondvecError(f"guidance_rescale must be between 0 and 1, got {guidance_rescale}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [p for p in negatives for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        do_cfg = guidance_scale > 1.0

        unet, table = self.unet, self.table
        device, dtype = unet.device, unet.dtype
        scale = self.vae_scale_factor
        sample_size = unet.config.sample_size
        sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
        height = height or sample_size * scale
        width = width or sample_size * scale
        if height % scale or width % scale:
            raise CondvecError(f"height and width must be multiples of {scale}, got {height}×{width}")

        tokens = tokenize(table, (negatives + prompts) if do_cfg else prompts, lenient=lenient)
        rows = Rows.from_table(table, tokens.rows)  # gathered once per call

        def conditioning(t) -> torch.Tensor:
            cond = pack(table, tokens, t, rows=rows).to(device=device, dtype=dtype)
            if do_cfg and zero_negative:
                cond = torch.cat([torch.zeros_like(cond[:batch]), cond[batch:]])
            return cond

        static = conditioning(0.0) if table.num_anchors == 1 else None  # re-encode only with timestep anchors
        added = self._added_cond(prompts, negatives, zero_negative, do_cfg, height, width, original_size,
                                 crops_coords_top_left, target_size, lenient) if self.is_sdxl else None

        shape = (batch, unet.config.in_channels, height // scale, width // scale)
        timesteps, latents = self._initial_latents(image, strength, shape, generator, device, dtype,
                                                   num_inference_steps)
        step_kwargs = self._step_kwargs(generator, eta)

        with patched(unet, table), cached_kv(unet):  # constant conditioning: K and V projected once per call
            for i, t in enumerate(self.progress_bar(timesteps)):
                cond = static if static is not None else conditioning(float(t))
                model_in = torch.cat([latents] * 2) if do_cfg else latents
                model_in = self.scheduler.scale_model_input(model_in, t)
                noise_pred = unet(model_in, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
                if do_cfg:
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (text - uncond)
                    if guidance_rescale > 0:
                        noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    result = callback_on_step_end(self, i, t, {"latents": latents})
                    if result and "latents" in result:
                        latents = result["latents"]

        if output_type == "latent":
            images = latents
        else:
            if self.vae is not None:
                images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            else:
                images = latents
            images = VaeImageProcessor(vae_scale_factor=scale).postprocess(images.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # ----------------------------------------------------------------- save / load (offline, no pickle)
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save UNet, scheduler, VAE (if any) in diffusers layout and the table as ``table/table.safetensors``."""
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        self.unet.save_pretrained(os.path.join(save_directory, "unet"), safe_serialization=True)
        self.scheduler.save_pretrained(os.path.join(save_directory, "scheduler"))
        index = {
            "_class_name": type(self).__name__,
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", type(self.unet).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "vae": [None, None],
            "table": ["conditioner", "TagTable"],
        }
        if self.vae is not None:
            self.vae.save_pretrained(os.path.join(save_directory, "vae"), safe_serialization=True)
            index["vae"] = ["diffusers", type(self.vae).__name__]
        self.table.save(os.path.join(save_directory, TABLE_FILE))
        with open(os.path.join(save_directory, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, table: TagTable | str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> TagDiffusionPipeline:
        """Load a pipeline from a local folder (``unet/``, ``scheduler/``, optional ``vae/`` and ``table/``).

        Args:
            pretrained_model_name_or_path (`str`): a local folder; nothing is downloaded.
            table (`TagTable | str`, *optional*): a table or table file to use instead of the folder's own.
            torch_dtype (`torch.dtype`, *optional*): dtype for the UNet and VAE.
        """
        unet, scheduler, vae, folder_table = load_components(os.fspath(pretrained_model_name_or_path), torch_dtype,
                                                             with_table=table is None)
        if isinstance(table, (str, os.PathLike)):
            table = TagTable.load(table)
        table = table or folder_table
        if table is None:
            raise FileNotFoundError(
                f"{pretrained_model_name_or_path!r} has no {TABLE_FILE}: pass table=PATH (or --table FILE)"
            )
        return cls(unet=unet, scheduler=scheduler, vae=vae, table=table)


def load_components(model_dir: str, torch_dtype: torch.dtype | None = None, with_table: bool = True):
    """Load ``(unet, scheduler, vae | None, table | None)`` from a local diffusers-layout folder, offline.

    Loads through :func:`unet_patch.load.load_model` (the same checks and family detection as training and
    bootstrap), without text encoders; generation needs the folder's own ``scheduler/``.
    """
    model = load_model(model_dir, with_text_encoders=False, torch_dtype=torch_dtype, with_table=with_table)
    if not model.has_scheduler:
        raise FileNotFoundError(f"{model_dir!r} has no scheduler/scheduler_config.json")
    return model.unet, model.scheduler, model.vae, model.table
