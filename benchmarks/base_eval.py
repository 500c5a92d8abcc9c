"""Attribute accuracy of a base model on prompts of known tags, read back by the detector.

    python -m benchmarks.base_eval [--model models/mini-sd] [--table T] [--three-way WORK] [--guidance 3] [--num 8]

One-object prompts: fraction of samples with each attribute right (and all of them). Two-object prompts: fraction
of samples with two objects, and with both objects right in every attribute (binding: ``red circle, blue square``
must not give a blue circle).

``--recovery`` adds where attributes are decided: real demo images are noised to a fraction of the schedule and
denoised with their own captions; the fraction of results that keep each attribute shows at which noise level the
model can no longer restore it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from conditioner.encode import encode
from demo.data import generate_demo_dataset
from demo.detector import ATTRIBUTES, check_one, detect, match_two
from train.optim import TABLE_LR
from unet_patch import TagDiffusionPipeline, patched

CASES = [("red", "circle", "large", "center", "white"), ("blue", "square", "small", "left", "black"),
         ("yellow", "triangle", "large", "right", "gray"), ("green", "circle", "small", "right", "white"),
         ("magenta", "square", "large", "center", "gray"), ("cyan", "triangle", "small", "left", "black")]
TWO_CASES = [
    ((("red", "circle", "large", "left"), ("blue", "square", "small", "right")), "white"),
    ((("yellow", "triangle", "small", "left"), ("green", "circle", "large", "right")), "black"),
    ((("cyan", "square", "large", "left"), ("magenta", "triangle", "small", "right")), "gray"),
]


def one_object_prompt(colour: str, shape: str, size: str, position: str, background: str) -> str:
    """The caption the demo data would give this one-object scene."""
    return f"{colour} {shape}, {size} {shape}, {shape} on {position}, {background} background"


def two_object_prompt(objects, background: str) -> str:
    """The caption the demo data would give this two-object scene."""
    tags = [f"{c} {s}, {z} {s}, {s} on {p}" for c, s, z, p in objects]
    return ", ".join(tags) + f", two objects, {background} background"


def stock_sampler(model: str, guidance: float, steps: int, num: int):
    """``prompt -> images`` through diffusers' own ``StableDiffusionPipeline`` and the model's text encoder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def sample(prompt):
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=num,
                    generator=torch.Generator().manual_seed(0)).images

    return sample


def table_sampler(model: str, guidance: float, steps: int, num: int, table: str | None = None):
    """``prompt -> images`` through condvec's ``TagDiffusionPipeline`` (the folder's table, or ``table``)."""
    pipe = TagDiffusionPipeline.from_pretrained(model, table=table)
    pipe.set_progress_bar_config(disable=True)

    def sample(prompt):
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=num,
                    generator=torch.Generator().manual_seed(0)).images

    return sample


def evaluate(model: str, guidance: float, steps: int, num: int, table: str | None = None,
             text_encoder: bool | None = None) -> dict:
    """Fraction of samples with each attribute right (one-object prompts) and both objects right (two-object).

    Samples come from the model's own text encoder (stock ``StableDiffusionPipeline``) when the folder has one and
    no ``table`` is given (or ``text_encoder=True``), otherwise from a condvec table.
    """
    if text_encoder is None:
        text_encoder = table is None and (Path(model) / "text_encoder").is_dir()
    if text_encoder:
        sample = stock_sampler(model, guidance, steps, num)
    else:
        sample = table_sampler(model, guidance, steps, num, table)
    return score(sample)


def score(sample) -> dict:
    """Score a ``prompt -> images`` sampler on the one- and two-object prompts (see :func:`evaluate`)."""
    checks = []
    for colour, shape, size, position, background in CASES:
        want = {"colour": colour, "shape": shape, "size": size, "position": position}
        checks += [check_one(detect(image), want, background)
                   for image in sample(one_object_prompt(colour, shape, size, position, background))]
    result = {key: sum(c[key] for c in checks) / len(checks) for key in checks[0]} | {"samples": len(checks)}

    two = dict.fromkeys(("two objects", "colours bound", "both right"), 0)
    m = 0
    for objects, background in TWO_CASES:
        wanted = [dict(zip(("colour", "shape", "size", "position"), o)) for o in objects]
        for image in sample(two_object_prompt(objects, background)):
            m += 1
            found = detect(image)
            if len(found["objects"]) != 2 or found["background"] != background:
                continue
            two["two objects"] += 1
            best = match_two(found["objects"], wanted)
            two["colours bound"] += int(all(best[i]["colour"] == wanted[i]["colour"]
                                            and best[i]["shape"] == wanted[i]["shape"] for i in range(2)))
            two["both right"] += int(all(best[i][a] == wanted[i][a] for i in range(2) for a in ATTRIBUTES))
    result["two-object prompts"] = {key: value / m for key, value in two.items()} | {"samples": m}
    return result


@torch.no_grad()
def recovery(model: str, starts: list[float], num: int, guidance: float, steps: int) -> dict:
    """Noise real one-object demo images to ``start`` × the schedule, denoise with their captions, re-detect.

    Returns ``{start: {attribute: fraction kept}}``; start 0 is the images themselves.
    """
    pipe = TagDiffusionPipeline.from_pretrained(model)
    unet, table = pipe.unet, pipe.table
    with tempfile.TemporaryDirectory() as tmp:
        records = generate_demo_dataset(tmp, num, size=unet.config.sample_size, seed=7, two_object_prob=0.0)
        images = [np.asarray(Image.open(Path(tmp) / r["file_name"]).convert("RGB")) for r in records]
    x0 = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    cond = encode(table, [r["caption"] for r in records] + [""] * num)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    result = {}
    for start in starts:
        timesteps = [t for t in scheduler.timesteps if t < start * scheduler.config.num_train_timesteps]
        x = scheduler.add_noise(x0, noise, torch.full((num,), int(timesteps[0]))) if timesteps else x0.clone()
        with patched(unet, table):
            for t in timesteps:
                out = unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample
                text, uncond = out.chunk(2)
                x = scheduler.step(uncond + guidance * (text - uncond), t, x).prev_sample
        arrays = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        checks = [check_one(detect(array), record["objects"][0], record["background"])
                  for record, array in zip(records, arrays)]
        result[start] = {k: sum(c[k] for c in checks) / num for k in ("one object", *ATTRIBUTES)}
    return result


# table-only fine-tuning rates of the three-way comparison (BENCHMARKS.md, "What dropping CLIP keeps"): every
# bootstrapped tag trains at once here, unlike the few new concepts condvec-train's defaults were tuned for
FINETUNE_LR = {layout: TABLE_LR["every tag"][layout] for layout in ("single", "layers")}


def three_way(model: str, guidance: float, steps: int, num: int, finetune_steps: int, work: Path,
              data_images: int = 4000, tokens_per_tag: int = 1, layouts: tuple = ("single", "layers"),
              finetune_lr: dict | None = None) -> dict:
    """What dropping CLIP keeps: the same prompts through the model's CLIP, through tables bootstrapped from it
    (``single`` and ``layers``), and through those tables after table-only fine-tuning (frozen UNet) on demo scenes.

    Every table holds the demo vocabulary (:func:`demo.data.tag_vocabulary`); the fine-tuning runs
    ``finetune_steps`` steps of ``condvec-train`` (batch 32) on ``data_images`` scenes, at ``finetune_lr[layout]``
    (default :data:`FINETUNE_LR`: the rates the published table used).
    ``tokens_per_tag`` vectors per tag: the tag's tokens, then its EOS (:func:`bootstrap.text.tag_vectors`).
    """
    from bootstrap.table import bootstrap_table
    from demo.data import tag_vocabulary
    from train.config import load_config
    from train.loop import train
    from unet_patch.load import load_model

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data").exists():  # the scenes the fine-tuning learns from (seed 0, as condvec-train's default)
        generate_demo_dataset(work / "data", data_images, size=32, seed=0)
    results = {"clip": evaluate(model, guidance, steps, num, text_encoder=True)}
    base = load_model(model)
    for groups in layouts:
        start = work / f"bootstrap-{groups}.safetensors"
        bootstrap_table(base, tag_vocabulary(), groups=groups, tokens_per_tag=tokens_per_tag,
                        progress=False).save(start)
        results[f"bootstrap {groups}"] = evaluate(model, guidance, steps, num, table=str(start))
        run = work / f"finetune-{groups}"
        began = time.perf_counter()
        train(load_config(None, [
            f"model.pretrained={model}", f"data.path={work / 'data'}",
            "data.resolution=32", "data.bucketing=false", "data.caption_dropout=0.0", f"table.start_from={start}",
            "table.train_special=false", "training.train=table", f"training.steps={finetune_steps}",
            f"training.lr={(finetune_lr or FINETUNE_LR)[groups]}",
            "training.batch_size=32", "training.min_snr_gamma=0", f"output.dir={run}", "output.overwrite=true",
            "output.sample_every=0", f"output.save_every={finetune_steps}", "output.progress=false"]))
        results[f"fine-tuned {groups}"] = evaluate(model, guidance, steps, num, table=str(run / "table.safetensors"))
        results[f"fine-tuned {groups}"]["fine-tune seconds"] = round(time.perf_counter() - began, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.base_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/mini-sd")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--num", type=int, default=8)
    parser.add_argument("--table", help="score this condvec table on the model instead of its text encoder")
    parser.add_argument("--recovery", type=float, nargs="*", metavar="START",
                        help="also measure attribute recovery from these noise fractions (e.g. 0.3 0.5 0.7 0.9)")
    parser.add_argument("--three-way", type=Path, metavar="WORK",
                        help="score CLIP, bootstrapped tables and fine-tuned tables (runs under WORK)")
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--tokens-per-tag", type=int, default=1, help="three-way: vectors per bootstrapped tag")
    parser.add_argument("--layouts", default="single,layers", help="three-way: table layouts to bootstrap")
    parser.add_argument("--finetune-lr", action="append", default=[], metavar="LAYOUT=LR",
                        help="three-way: fine-tuning rate of a layout (default: FINETUNE_LR)")
    args = parser.parse_args(argv)
    if args.recovery and (Path(args.model) / "vae").is_dir():
        parser.error("--recovery noises images in pixel space: run it on a pixel-space base (--model "
                     "models/tiny-base)")
    if args.three_way:
        print(json.dumps(three_way(args.model, args.guidance, args.steps, args.num, args.finetune_steps,
                                   args.three_way, tokens_per_tag=args.tokens_per_tag,
                                   layouts=tuple(args.layouts.split(",")),
                                   finetune_lr=FINETUNE_LR | {k: float(v) for k, _, v in
                                                              (item.partition("=") for item in args.finetune_lr)})))
        return 0
    result = evaluate(args.model, args.guidance, args.steps, args.num, table=args.table)
    if args.recovery:
        result["recovery"] = recovery(args.model, args.recovery, 48, args.guidance, args.steps)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
