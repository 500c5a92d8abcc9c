"""``condvec-generate``: images from tag prompts with a diffusers-layout model folder and a condvec table."""

from __future__ import annotations

import math
import os
import sys

from conditioner.cli_errors import OneLineArgumentParser, UsageError, run_cli
from conditioner.fileio import atomic_path

PROG = "condvec-generate"
#: Bounds on what a user sets (each named in the error): past them a run only exhausts memory.
MAX_STEPS, MAX_NUM, MAX_UPSCALE, MAX_SIZE = 1000, 256, 16, 4096

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


def _outputs(out: str, num: int) -> list[str]:
    """The files a run writes: ``out``, and with several images ``OUT-0.png`` … as well."""
    return [out] if num == 1 else [out] + [f"{out[:-4]}-{i}.png" for i in range(num)]


def _write(images: list, out: str, upscale_by: int) -> str:
    """Save one PNG, or every image plus a grid (each file atomically); returns what was written."""
    from unet_patch.grid import image_grid, upscale

    images = [upscale(image, upscale_by) for image in images]
    if len(images) == 1:
        _save(images[0], out)
        return f"wrote {out}"
    stem = out[:-4]
    for i, image in enumerate(images):
        _save(image, f"{stem}-{i}.png")
    _save(image_grid(images), out)
    return f"wrote {len(images)} images {stem}-0.png … {stem}-{len(images) - 1}.png and the grid {out}"


def _save(image, path: str) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--model", required=True, help="diffusers-layout folder with unet/, scheduler/ and optional vae/")
    p.add_argument("--table", help="table .safetensors (default: MODEL/table/table.safetensors)")
    p.add_argument("--prompt", required=True, help='comma-separated tags, e.g. "red circle, (large circle:1.3)"')
    p.add_argument("--negative", default="", help="negative tags (default: the null prompt)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20, as the trainer's sample grids)")
    p.add_argument("--guidance", type=float, default=3.0,
                   help="classifier-free guidance scale (default 3, as the trainer's sample grids)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="CFG rescale in [0, 1] against over-exposure at high guidance (0.7 is typical; default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--num", type=int, default=1, help="number of images (default 1); several are also gridded")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="override the model's scheduler")
    p.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscale factor for viewing tiny images")
    p.add_argument("--lenient", action="store_true", help="skip unknown tags with a warning instead of failing")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default="condvec.png",
                   help="output PNG (default condvec.png); with --num N also OUT-0.png … OUT-(N-1).png")
    p.add_argument("--force", action="store_true", help="replace output PNGs that already exist")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``condvec-generate``; returns 0, or 2 with a one-line error on stderr on bad input."""
    return run_cli(PROG, lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    for flag, value, high in (("--steps", args.steps, MAX_STEPS), ("--num", args.num, MAX_NUM),
                              ("--upscale", args.upscale, MAX_UPSCALE)):
        if not 1 <= value <= high:
            raise UsageError(f"{flag} must be between 1 and {high}, got {value}")
    if args.size is not None and not (8 <= args.size <= MAX_SIZE and args.size % 8 == 0):
        raise UsageError(f"--size must be a multiple of 8 between 8 and {MAX_SIZE}, got {args.size}")
    if not math.isfinite(args.guidance) or not 0.0 <= args.guidance <= 100.0:
        raise UsageError(f"--guidance must be between 0 and 100, got {args.guidance}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise UsageError(f"--guidance-rescale must be between 0 and 1, got {args.guidance_rescale}")
    if not 0 <= args.seed < 2 ** 64:
        raise UsageError(f"--seed must be between 0 and 2**64 - 1, got {args.seed}")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out must be a .png path, got {args.out!r}")
    outputs = _outputs(args.out, args.num)
    existing = [path for path in outputs if os.path.lexists(path)]
    if existing and not args.force:
        raise UsageError(f"{existing[0]!r} already exists ({len(existing)} of the {len(outputs)} output file(s)); "
                         "pass --force to replace, or choose another --out")
    import diffusers
    import torch

    from unet_patch.pipeline import TagDiffusionPipeline, check_device

    check_device(args.device)
    pipe = TagDiffusionPipeline.from_pretrained(args.model, table=args.table)
    if args.scheduler:
        cls = getattr(diffusers, SCHEDULERS[args.scheduler])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.to(args.device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = pipe(
        args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
        guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale, num_images_per_prompt=args.num,
        generator=generator, height=args.size, width=args.size, lenient=args.lenient,
    ).images
    print(_write(images, args.out, args.upscale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
