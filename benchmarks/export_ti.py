"""A condvec concept exported as textual inversion, through diffusers' stock pipeline, against the condvec tag.

    python -m benchmarks.export_ti --table runs/quickstart/table.safetensors [--model models/mini-sd] [--num 16]

For each concept of the quickstart (``mascot``: a large magenta circle, ``badge``: a small cyan square): the tag is
exported with :func:`bootstrap.export.export_embedding`, loaded into diffusers' own ``StableDiffusionPipeline`` with
``load_textual_inversion`` and prompted as ``<tag>, white background``; the same prompt runs through condvec's
``TagDiffusionPipeline`` with the table. The detector scores each sample (one object with the concept's colour,
shape and size); the same seeds, sampler (25 DDIM steps) and guidance (3) for both. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

import torch

CONCEPTS = {"mascot": {"colour": "magenta", "shape": "circle", "size": "large"},
            "badge": {"colour": "cyan", "shape": "square", "size": "small"}}


def _right(images, want: dict) -> float:
    from demo.detector import detect

    hits = 0
    for image in images:
        objects = detect(image)["objects"]
        hits += int(len(objects) == 1 and all(objects[0][k] == v for k, v in want.items()))
    return hits / len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_ti", description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="runs/quickstart/table.safetensors")
    parser.add_argument("--model", default="models/mini-sd")
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400, help="export optimisation steps")
    args = parser.parse_args(argv)

    from diffusers import StableDiffusionPipeline

    from bootstrap.export import export_embedding
    from conditioner.table import TagTable
    from unet_patch import TagDiffusionPipeline
    from unet_patch.load import load_model

    table = TagTable.load(args.table)
    model = load_model(args.model)
    ours = TagDiffusionPipeline.from_pretrained(args.model, table=table)
    ours.set_progress_bar_config(disable=True)

    def sample(pipe, prompt):
        return pipe(prompt, num_inference_steps=25, guidance_scale=3.0, num_images_per_prompt=args.num,
                    generator=torch.Generator().manual_seed(0)).images

    result = {}
    for tag, want in CONCEPTS.items():
        if tag not in table:
            continue
        tensors, report = export_embedding(model, table, tag, steps=args.steps)
        stock = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None,
                                                        requires_safety_checker=False, local_files_only=True)
        stock.set_progress_bar_config(disable=True)
        stock.load_textual_inversion(tensors["emb_params"], token=f"<{tag}>")
        result[tag] = {"export relative error": round(report.relative_error, 4),
                       "textual inversion (stock pipeline)": _right(sample(stock, f"<{tag}>, white background"),
                                                                     want),
                       "condvec tag": _right(sample(ours, f"{tag}, white background"), want), "samples": args.num}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
