"""Where the prompt lives in CLIP's output: a per-position intervention study on held-out prompts.

    python -m benchmarks.interventions [--model models/mini-sd] [--num 64] [--out FILE.json] [--rows ROW …]

CLIP's output for a prompt of ``k`` tokens is BOS (position 0), the tokens (1 … k), EOS (k + 1) and padding
(k + 2 … 76). Each row of the study builds a 77-position sequence from three sources and scores it through the stock
pipeline on the same held-out scenes (:mod:`benchmarks.heldout`):

- ``clip``: the prompt's own CLIP output at those positions;
- ``null``: the encoding of ``""`` at those positions (what a bootstrapped table puts where no tag stands);
- ``tags``: each tag encoded alone, one vector per tag (its last token), in the token positions (the rest ``null``):
  what a bootstrapped ``single`` table gives;
- ``offset``: ``null`` plus one vector added at every padding / EOS position: the mean over the prompt's tags of
  that tag's own offset (its alone-encoding minus ``null``, averaged over its EOS and padding positions) — a context
  that a table can store per tag and combine order-free;
- ``clip-mean``: ``null`` plus the mean of the prompt's own CLIP offset over those positions (a uniform context that
  is exact on average: how much of the padding's content survives when it is the same at every position).

Positions do not matter to the UNet's cross-attention (it has none): only which vectors are present, and how many.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.heldout import ratio_interval, run_scenes, scenes, stock_embeds_sampler, summary

# (name, token part, EOS part, padding part)
ROWS = [
    ("CLIP, every position", "clip", "clip", "clip"),
    ("CLIP tokens, null EOS + padding", "clip", "null", "null"),
    ("CLIP tokens + EOS, null padding", "clip", "clip", "null"),
    ("null tokens, CLIP EOS + padding", "null", "clip", "clip"),
    ("CLIP tokens, EOS + padding = their mean (clip-mean)", "clip", "clip-mean", "clip-mean"),
    ("tags alone (bootstrapped table)", "tags", "null", "null"),
    ("tags alone, CLIP EOS + padding", "tags", "clip", "clip"),
    ("tags alone, EOS + padding = null + mean tag offset", "tags", "offset", "offset"),
    ("tags alone, EOS + padding = clip-mean", "tags", "clip-mean", "clip-mean"),
    ("tags alone, EOS + padding = null + per-position mean tag offset", "tags", "offsets", "offsets"),
    *[(f"tag blocks (each tag alone: tokens, EOS, {m} padding rows)", f"block{m}", "null", "null")
      for m in (4, 8, 16)],
]


@torch.no_grad()
def build(pipe, prompt: str, token: str, eos: str, pad: str, null: torch.Tensor, cache: dict) -> torch.Tensor:
    """The ``(77, D)`` sequence of one row for one prompt."""
    tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    clip = pipe.text_encoder(ids)[0][0]  # (77, D)
    k = int((ids[0, 1:] == tok.eos_token_id).int().argmax()) + 1 - 1  # tokens between BOS and EOS
    tags = [t.strip() for t in prompt.split(",")]
    alone = []
    for tag in tags:
        if tag not in cache:
            tid = tok(tag, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = pipe.text_encoder(tid)[0][0]
            n = int((tid[0, 1:] == tok.eos_token_id).int().argmax())
            cache[tag] = (out[n], (out[n + 1:] - null[n + 1:]).mean(0), out - null, out[1:n + 1], out[n + 1:])
        alone.append(cache[tag])
    seq = null.clone()
    seq[0] = clip[0]  # BOS: identical in every prompt (causal attention)
    if token == "clip":
        seq[1:k + 1] = clip[1:k + 1]
    elif token == "tags":
        seq[1:1 + len(alone)] = torch.stack([a[0] for a in alone])
    elif token.startswith("block"):
        m = int(token[5:])
        blocks = torch.cat([torch.cat([a[3], a[4][:m + 1]]) for a in alone])  # tokens, EOS, m padding rows
        seq = torch.cat([seq[:1], blocks, null[1 + len(blocks):]])
        return seq
    rest = slice(k + 1, 77)
    context = {"clip-mean": (clip[rest] - null[rest]).mean(0), "offset": torch.stack([a[1] for a in alone]).mean(0)}
    offsets = torch.stack([a[2] for a in alone]).mean(0)  # (77, D) per-position mean offset
    for part, where in ((eos, slice(k + 1, k + 2)), (pad, slice(k + 2, 77))):
        if part == "clip":
            seq[where] = clip[where]
        elif part == "offsets":
            seq[where] = null[where] + offsets[where]
        elif part in context:
            seq[where] = null[where] + context[part]
    return seq


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.interventions", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/mini-sd")
    parser.add_argument("--num", type=int, default=64, help="held-out scenes of each kind (one- and two-object)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/interventions.json"))
    parser.add_argument("--rows", nargs="*", help="only these rows (and CLIP's)")
    args = parser.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    null = pipe.encode_prompt([""], "cpu", 1, False)[0][0]
    sample = stock_embeds_sampler(pipe)
    cache: dict = {}
    kinds = {"one-object": scenes(args.num, two=False), "two-object": scenes(args.num, two=True)}
    results, hits, began = [], {}, time.perf_counter()
    for name, token, eos, pad in [r for r in ROWS if not args.rows or r[0] in args.rows or r is ROWS[0]]:
        row = {"row": name}
        for kind, scene_list in kinds.items():
            def by_prompt(prompts, seed, token=token, eos=eos, pad=pad):
                seqs = [build(pipe, p, token, eos, pad, null, cache) for p in prompts]
                length = max(len(q) for q in seqs)  # longer than 77: padded with the last null row
                embeds = torch.stack([torch.cat([q, null[-1:].expand(length - len(q), -1)]) for q in seqs])
                return sample(embeds, seed)
            hits[(name, kind)] = run_scenes(by_prompt, scene_list)
            row[kind] = summary(hits[(name, kind)])
            row[kind]["of CLIP"] = ratio_interval(hits[(name, kind)], hits[(ROWS[0][0], kind)])
        results.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "scenes": args.num, "rows": results,
                                    "seconds": round(time.perf_counter() - began, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
