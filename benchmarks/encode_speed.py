"""Encoding cost at SD1.5 scale: condvec's packed encoding vs a CLIP-L-shaped text transformer forward.

    python -m benchmarks.encode_speed [--repeats 50]

The table has SD1.5's layout (16 attn2 layers, cross_attention_dim 768) with 1000 tags; a prompt has 20 tags.
The reference is a randomly initialised transformer with CLIP ViT-L/14's text-encoder shape (12 layers, width 768,
12 heads, MLP 3072, 77 tokens) — the same arithmetic as CLIP's forward, no weights needed. Times are medians, batch 1,
measured side by side in one process.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from conditioner import LayerSpec, TagTable, encode


def sd15_layers() -> list[LayerSpec]:
    """SD1.5's 16 cross-attention layers (names, dims, blocks, kohya names)."""
    layers = []
    widths = {0: 320, 1: 640, 2: 1280}
    kohya_in = {(0, 0): 1, (0, 1): 2, (1, 0): 4, (1, 1): 5, (2, 0): 7, (2, 1): 8}
    for (i, j), k in kohya_in.items():
        layers.append(LayerSpec(f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2", f"down.{i}.{j}",
                                f"down_blocks.{i}", 768, widths[i], 8, f"IN{k:02d}"))
    layers.append(LayerSpec("mid_block.attentions.0.transformer_blocks.0.attn2", "mid.0", "mid_block", 768, 1280, 8,
                            "M00"))
    up_widths = {1: 1280, 2: 640, 3: 320}
    for i in (1, 2, 3):
        for j in range(3):
            layers.append(LayerSpec(f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2", f"up.{i}.{j}",
                                    f"up_blocks.{i}", 768, up_widths[i], 8, f"OUT{i * 3 + j:02d}"))
    return layers


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encode_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    layers = sd15_layers()
    tags = [f"tag {i}" for i in range(1000)]
    prompt = ", ".join(tags[i * 37 % 1000] for i in range(20))
    clip = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(768, 12, 3072, activation="gelu", batch_first=True, norm_first=True), 12,
        enable_nested_tensor=False,
    ).eval()
    tokens = torch.randn(1, 77, 768)
    rows = []
    with torch.no_grad():
        clip_ms = _median_ms(lambda: clip(tokens), args.repeats)
        rows.append(("CLIP-L-shaped text transformer, 77 tokens", clip_ms, 77 * 768 * 4))
        for groups in ("single", "layers"):
            for pad_to in (77, None):
                table = TagTable.create(layers, tags=tags, groups=groups, pad_to=pad_to, init_std=0.02)
                out = encode(table, [prompt])
                ms = _median_ms(lambda t=table: encode(t, [prompt]), args.repeats)
                rows.append((f"condvec {groups}, {'pad_to 77' if pad_to else 'dynamic'} → {tuple(out.shape)}", ms,
                             out.numel() * 4))
        table = TagTable.create(layers, tags=tags, groups="layers", pad_to=77, init_std=0.02)
        table.set_value_source(tags[0], torch.randn(1, table.width))
        split_prompt = prompt + ", " + tags[0]
        out = encode(table, [split_prompt])
        ms = _median_ms(lambda: encode(table, [split_prompt]), args.repeats)
        rows.append((f"condvec layers, pad_to 77, one swapped tag → {tuple(out.shape)}", ms, out.numel() * 4))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"command: python -m benchmarks.encode_speed --repeats {args.repeats}\n")
    print("| what | median ms | CLIP-L-shaped forward / this | output bytes |")
    print("| --- | ---: | ---: | ---: |")
    for name, ms, nbytes in rows:
        print(f"| {name} | {ms:.3f} | {clip_ms / ms:.1f}× | {nbytes / 1e6:.2f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
