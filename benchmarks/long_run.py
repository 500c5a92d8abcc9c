"""Long runs: resident memory while one process generates many images with ``TagDiffusionPipeline``.

    python -m benchmarks.long_run [--images 200] [--threads 1] [--trace-python] [--out benchmarks/results]

Loads the shipped ``models/tiny-base`` (pixel space, 32 px) once, then generates one image at a time — each with its
own prompt (cycling through tag combinations of the base's table), negative prompt, seed and guidance — and reads the
process's resident set size (``/proc/self/statm``) after every image. Writes ``long-run-memory.csv`` (image, RSS in
MiB, seconds, and with ``--trace-python`` the Python heap traced since warm-up) and ``long-run-memory.png`` (the RSS
curve), and prints start, after warm-up, end, max and the slope per 100 images after warm-up (least squares). Not
part of the test suite: about 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import time
import tracemalloc
from pathlib import Path

import torch

from conditioner.fileio import atomic_path
from unet_patch import TagDiffusionPipeline

REPO = Path(__file__).resolve().parents[1]
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white background", "black background", "gray background")


def rss_mib() -> float:
    """This process's resident set size in MiB, from ``/proc/self/statm`` (Linux)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def prompts(table_tags: list[str], count: int) -> list[tuple[str, str]]:
    """``count`` (prompt, negative prompt) pairs, all different where the tags allow, using only the table's tags."""
    known = set(table_tags)
    pairs = []
    for i in range(count):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        size = ("large", "small")[(i // 18) % 2]
        background = BACKGROUNDS[(i // 36) % len(BACKGROUNDS)]
        position = ("left", "right", "center")[(i // 2) % 3]
        tags = [f"{colour} {shape}", f"{size} {shape}", f"{shape} on {position}", background]
        weight = 1.0 + (i % 5) / 10
        tags = [t for t in tags if t in known]
        prompt = ", ".join(f"({t}:{weight:g})" if j == 0 else t for j, t in enumerate(tags))
        negative = f"{SHAPES[(i + 1) % len(SHAPES)]} on {position}" if i % 3 else ""  # every third: no negative
        pairs.append((prompt, negative if negative in known else ""))
    return pairs


def slope_per_100(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``, scaled to 100 images."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    return 100 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_run", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images to generate, one call each (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="images before the warm-up reading (default 10)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image (default 20)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: a tiny UNet gains nothing from more, and spins on busy cores)")
    parser.add_argument("--trace-python", action="store_true",
                        help="also record the Python heap (tracemalloc, started after warm-up; slows each call)")
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-base"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.images <= args.warmup + 1:
        parser.error(f"--images must exceed --warmup + 1 ({args.warmup + 1}); got {args.images}")

    torch.set_num_threads(args.threads)
    before_load = rss_mib()
    pipe = TagDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    loaded = rss_mib()
    rows, started = [], time.perf_counter()
    for i, (prompt, negative) in enumerate(prompts(pipe.table.tags, args.images), start=1):
        generator = torch.Generator().manual_seed(i)
        image = pipe(prompt, negative_prompt=negative or None, num_inference_steps=args.steps,
                     guidance_scale=2.0 + (i % 3), generator=generator).images[0]
        assert image.size == (32, 32), image.size
        del image
        if args.trace_python and i == args.warmup:
            gc.collect()
            tracemalloc.start()
        heap = tracemalloc.get_traced_memory()[0] / 1024 if tracemalloc.is_tracing() else float("nan")
        rows.append((i, rss_mib(), time.perf_counter() - started, heap))
    gc.collect()
    after_gc = rss_mib()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "long-run-memory.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "rss_mib", "seconds", "python_heap_kib"])
        writer.writerows((i, f"{rss:.2f}", f"{seconds:.2f}", f"{heap:.1f}") for i, rss, seconds, heap in rows)

    images, rss = [r[0] for r in rows], [r[1] for r in rows]
    warm = rows[args.warmup - 1][1]
    tail = [r for r in rows if r[0] >= args.warmup]
    slope = slope_per_100([r[0] for r in tail], [r[1] for r in tail])
    summary = (f"{args.images} images, {args.steps} steps each, {rows[-1][2]:.0f} s; RSS (MiB): before load "
               f"{before_load:.1f}, loaded {loaded:.1f}, after image 1 {rss[0]:.1f}, after warm-up (image "
               f"{args.warmup}) {warm:.1f}, end {rss[-1]:.1f}, max {max(rss):.1f}, after gc {after_gc:.1f}; "
               f"slope after warm-up {slope:+.2f} MiB per 100 images")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    ax.plot(images, rss, lw=1.2)
    ax.axhline(loaded, color="gray", ls="--", lw=0.8, label=f"after loading the pipeline ({loaded:.0f} MiB)")
    ax.axvline(args.warmup, color="gray", ls=":", lw=0.8, label=f"warm-up ({args.warmup} images)")
    ax.set_xlabel("images generated (one call each)")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"TagDiffusionPipeline, models/tiny-base: slope {slope:+.2f} MiB / 100 images", fontsize=10)
    ax.set_ylim(0, max(rss) * 1.15)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out / "long-run-memory.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)

    if args.trace_python:
        heaps = {i: heap for i, _, _, heap in rows}
        marks = sorted({args.warmup + 1, *range(100, args.images + 1, 100), args.images})
        summary += "; Python heap since warm-up (KiB): " + ", ".join(f"image {i} {heaps[i]:+.0f}" for i in marks)
    print(summary)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"wrote {out / 'long-run-memory.csv'} and {out / 'long-run-memory.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
