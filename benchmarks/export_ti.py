"""A condvec concept exported as textual inversion, through diffusers' stock pipeline, against the condvec tag.

    python -m benchmarks.export_ti --table runs/quickstart/table.safetensors [--model models/mini-sd] [--num 48]
        [--out FILE.json]

For each concept of the quickstart (``mascot``: a large magenta circle, ``badge``: a small cyan square): the tag is
exported as ``condvec-bootstrap export`` does, by each method — ``distill`` (its default for SD1.x / SD2.x:
:func:`bootstrap.export.distil_embedding`) and ``fit`` (:func:`bootstrap.export.export_embedding`) — at the CLI's
default steps, loaded into diffusers' own ``StableDiffusionPipeline`` with ``load_textual_inversion`` and prompted as
``<tag>, white background``; the same prompt runs through condvec's ``TagDiffusionPipeline`` with the table. The
detector scores each sample (one object with the concept's colour, shape and size); the same seeds, sampler (25 DDIM
steps) and guidance (3) for all. Prints (and writes) one JSON object with Wilson 95% intervals.
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
    parser.add_argument("--num", type=int, default=48)
    parser.add_argument("--steps", type=int, default=400, help="export optimisation steps (the CLI's default)")
    parser.add_argument("--vectors", type=int, nargs="+", default=[1],
                        help="vectors of the distilled embedding; one row per count (default 1, the CLI's)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from diffusers import StableDiffusionPipeline

    from benchmarks.heldout import wilson
    from bootstrap.export import distil_embedding, export_embedding
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

    def scored(images, want):
        hits = round(_right(images, want) * len(images))
        return {"right": hits / len(images), "interval": [round(x, 3) for x in wilson(hits, len(images))]}

    result = {}
    for tag, want in CONCEPTS.items():
        if tag not in table:
            continue
        result[tag] = {"condvec tag": scored(sample(ours, f"{tag}, white background"), want), "samples": args.num}
        multi = len(table.expand(tag)) > 1
        runs = [(f"distill, {v} vector(s)" if v > 1 else "distill", distil_embedding, {"vectors": v})
                for v in args.vectors] + [("fit", export_embedding, {})]
        for method, export, extra in runs:
            if method == "fit" and multi:  # a block of vectors has no one vector to fit
                result[tag][f"textual inversion, {method}"] = "not applicable: a multi-vector tag"
                continue
            tensors, report = export(model, table, tag, steps=args.steps, **extra)
            stock = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None,
                                                            requires_safety_checker=False, local_files_only=True)
            stock.set_progress_bar_config(disable=True)
            stock.load_textual_inversion(tensors["emb_params"], token=f"<{tag}>")
            result[tag][f"textual inversion, {method}"] = scored(sample(stock, f"<{tag}>, white background"), want) | {
                "export relative error": round(report.relative_error, 4)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
