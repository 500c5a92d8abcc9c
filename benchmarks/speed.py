"""Speed and memory of condvec against the stock text-encoder path, every figure side by side in one run.

    python -m benchmarks.speed [--repeats 5] [--latent 16] [--unet reduced|sd15] [--out FILE]

Models are randomly initialised from real configs (no download): transformers' ``CLIPTextModel`` with the CLIP-L
text config, SDXL's two encoders (CLIP-L penultimate + OpenCLIP bigG with projection), and a diffusers UNet with
SD1.5's architecture (16 attn2 layers, cross_attention_dim 768, 8 heads). ``--unet sd15`` uses SD1.5's real widths
(320, 640, 1280, 1280); the default ``reduced`` keeps SD1.5's block structure, layer count and 768-wide
cross-attention but narrower blocks (64, 128, 256, 256), so that a 2-core CPU finishes in minutes. A smaller UNet
makes condvec's own costs a *larger* share of a step, so the ratios are conservative. ``--latent`` sets the latent
size (16 → 128 px images; SD1.5 trains at 64).

Timing: every figure of a row is measured in the same loop, in alternating order, ``--warmup`` rounds discarded; the
table gives medians and the min–max spread. Peak memory is measured in a fresh subprocess per case
(``ru_maxrss``). Results go to stdout and ``--out`` as markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from conditioner import LayerSpec, TagTable, encode
from conditioner.encode import Rows, encode_pooled, pack, tokenize
from train.optim import RowSparseAdamW

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
REDUCED_WIDTHS = (64, 128, 256, 256)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def sdxl_layers() -> list[LayerSpec]:
    """SDXL's 70 attn2 layers (cross_attention_dim 2048): down 1 (640, 2×2), down 2 (1280, 2×10), mid (10), up 0
    (1280, 3×10), up 1 (640, 3×2)."""
    layers = []

    def add(prefix, block, attentions, depth, inner):
        for a in range(attentions):
            for d in range(depth):
                layers.append(LayerSpec(f"{prefix}.attentions.{a}.transformer_blocks.{d}.attn2",
                                        f"{block}.{a}.{d}", prefix, 2048, inner, inner // 64))

    add("down_blocks.1", "down.1", 2, 2, 640)
    add("down_blocks.2", "down.2", 2, 10, 1280)
    add("mid_block", "mid", 1, 10, 1280)
    add("up_blocks.0", "up.0", 3, 10, 1280)
    add("up_blocks.1", "up.1", 3, 2, 640)
    return layers


def unet_config(kind: str, latent: int) -> dict:
    config = dict(SD15_UNET, sample_size=latent)
    if kind == "reduced":
        config["block_out_channels"] = REDUCED_WIDTHS
    return config


def build_unet(kind: str, latent: int, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(kind, latent)).eval().requires_grad_(False)


def interleaved(cases: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Run every case once per round, order rotating each round; seconds per call of the rounds after warm-up."""
    names, times = list(cases), {name: [] for name in cases}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            cases[name]()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _iqr(seconds: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
    return q[0], q[2]


def separated(a: list[float], b: list[float]) -> bool:
    """Whether the inter-quartile ranges of two timing samples do not overlap."""
    (a_low, a_high), (b_low, b_high) = _iqr(a), _iqr(b)
    return a_high < b_low or b_high < a_low


def until_separated(cases: dict, repeats: int, warmup: int, max_repeats: int) -> tuple[dict, str]:
    """:func:`interleaved` rounds of two cases, more rounds until their inter-quartile ranges separate or
    ``max_repeats`` rounds show them overlapping; returns the times and the verdict in words."""
    times = interleaved(cases, repeats, warmup)
    a, b = list(times)
    while not separated(times[a], times[b]) and len(times[a]) < max_repeats:
        more = interleaved(cases, repeats, 0)
        for name in times:
            times[name] += more[name]
    rounds = len(times[a])
    verdict = (f"inter-quartile ranges separate after {rounds} rounds" if separated(times[a], times[b])
               else f"inter-quartile ranges overlap after {rounds} rounds: no measurable difference")
    return times, verdict


def summary(seconds: list[float]) -> dict:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "n": len(seconds)}


def fmt_time(s: dict) -> str:
    unit, scale = ("ms", 1e3) if s["median"] < 1 else ("s", 1.0)
    return f"{s['median'] * scale:.3g} {unit} ({s['min'] * scale:.3g}–{s['max'] * scale:.3g})"


def prompts(tags: list[str], count: int, per_prompt: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [", ".join(tags[i] for i in torch.randperm(len(tags), generator=gen)[:per_prompt].tolist())
            for _ in range(count)]


class Bench:
    """The shared models and tables of one run."""

    def __init__(self, args):
        from transformers import CLIPTextConfig, CLIPTextModel

        from unet_patch.discover import discover

        self.args = args
        self.unet_stock = build_unet(args.unet, args.latent)
        self.unet_condvec = copy.deepcopy(self.unet_stock)
        self.layers = discover(self.unet_condvec)
        torch.manual_seed(0)
        self.clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval().requires_grad_(False)
        self.tags = [f"tag {i}" for i in range(args.tags)]
        self.table = TagTable.create(self.layers, tags=self.tags, groups="layers", pad_to=77, init_std=0.02)
        from unet_patch.patch import install

        install(self.unet_condvec, self.table)
        self.results: list[dict] = []

    def row(self, figure: str, how: str, value: str, goal: str, met: bool | None, **raw) -> None:
        entry = {"figure": figure, "how": how, "value": value, "goal": goal, "met": met, **raw}
        self.results.append(entry)
        print(json.dumps(entry, default=str), flush=True)

    # ------------------------------------------------------------------ steps
    def condvec_step(self, table, opt, batch: list[str], latents, t):
        """One table training step: tokenize, gather the touched rows, pack, UNet forward + backward, row update."""
        tokens = tokenize(table, batch)
        rows = Rows(ids=tokens.rows, data=table.data[tokens.rows].clone().requires_grad_(True), special=table.special)
        cond = pack(table, tokens, t.float(), rows=rows)
        pred = self.unet_condvec(latents, t, encoder_hidden_states=cond).sample
        F.mse_loss(pred, latents).backward()
        opt.step(table.data, tokens.rows, rows.data.grad, 1e-3)

    def stock_step(self, sequence, latents, t):
        """The stock UNet fed a plain sequence, backward to that sequence (what a table step needs of the UNet)."""
        sequence = sequence.detach().requires_grad_(True)
        pred = self.unet_stock(latents, t, encoder_hidden_states=sequence).sample
        F.mse_loss(pred, latents).backward()

    def inputs(self, batch: int):
        gen = torch.Generator().manual_seed(batch)
        latents = torch.randn(batch, 4, self.args.latent, self.args.latent, generator=gen)
        return latents, torch.randint(0, 1000, (batch,), generator=gen)

    # ------------------------------------------------------------------ rows
    def encode_batch1(self):
        prompt = prompts(self.tags, 1, 20, seed=1)[0]
        tokens = torch.randint(0, 49408, (1, 77))
        cases = {"condvec": lambda: encode(self.table, [prompt]), "clip": lambda: self.clip(tokens)}
        with torch.no_grad():
            times = interleaved(cases, self.args.repeats * 4, self.args.warmup)
        c, k = summary(times["condvec"]), summary(times["clip"])
        ratio = k["median"] / c["median"]
        self.row("encode, batch 1 (SD1.5)", "20-tag prompt → 16 groups × 768, pad 77 vs CLIP-L forward (77 tokens)",
                 f"{ratio:.0f}× (condvec {fmt_time(c)}, CLIP-L {fmt_time(k)})", "≥ 1000×", ratio >= 1000,
                 condvec=c, clip=k)

    def encode_sdxl(self):
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(0)
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)).eval()
        table = TagTable.create(sdxl_layers(), tags=self.tags, groups="layers", pad_to=77, init_std=0.02)
        table.pooled, table.null_pooled = torch.zeros(len(self.tags), 1280), torch.zeros(1280)
        prompt = prompts(self.tags, 1, 20, seed=2)[0]
        tokens = torch.randint(0, 49408, (1, 77))

        def stock():
            hidden_l = clip_l(tokens, output_hidden_states=True).hidden_states[-2]
            out_g = clip_g(tokens, output_hidden_states=True)
            return torch.cat([hidden_l, out_g.hidden_states[-2]], -1), out_g.text_embeds

        cases = {"condvec": lambda: (encode(table, [prompt]), encode_pooled(table, [prompt])), "clip": stock}
        with torch.no_grad():
            times = interleaved(cases, self.args.repeats * 2, self.args.warmup)
        c, k = summary(times["condvec"]), summary(times["clip"])
        ratio = k["median"] / c["median"]
        self.row("encode, batch 1 (SDXL)", "20-tag prompt → 70 groups × 2048, pad 77, + pooled vs CLIP-L + bigG",
                 f"{ratio:.0f}× (condvec {fmt_time(c)}, encoders {fmt_time(k)})", "≥ 1000×", ratio >= 1000,
                 condvec=c, clip=k)

    def encode_floor(self):
        """Encoding against the memcpy floor of its own output: the same bytes copied, in the same loop."""
        sdxl = TagTable.create(sdxl_layers(), tags=self.tags, groups="layers", pad_to=77, init_std=0.02)
        for name, table in (("SD1.5", self.table), ("SDXL", sdxl)):
            for batch in (1, 32):
                texts = prompts(self.tags, batch, 20, seed=4 + batch)
                with torch.no_grad():
                    out = encode(table, texts)
                    source = out.clone()
                    cases = {"encode": lambda table=table, texts=texts: encode(table, texts),
                             "memcpy": lambda source=source: torch.empty_like(source).copy_(source)}
                    times = interleaved(cases, self.args.repeats * (4 if batch == 1 else 1), self.args.warmup)
                e, m = summary(times["encode"]), summary(times["memcpy"])
                ratio = e["median"] / m["median"]
                separated = e["min"] > m["max"] or e["max"] < m["min"]
                self.row(f"encode vs memcpy floor ({name}, batch {batch})",
                         f"20-tag prompts → {len(table.group_names)} groups × {table.dim}, pad 77: "
                         f"{out.numel() * 4 / 2**20:.0f} MiB written; floor = allocating and copying that many bytes",
                         f"{ratio:.2f}× (encode {fmt_time(e)}, memcpy {fmt_time(m)}; spreads "
                         f"{'separate' if separated else 'overlap'})", "≤ 2×", ratio <= 2.0, encode=e, memcpy=m)
        del sdxl

    def encode_batch32(self):
        batch = prompts(self.tags, self.args.batch, 20, seed=3)
        latents, t = self.inputs(self.args.batch)
        opt = RowSparseAdamW(len(self.table), (1, self.table.width))

        def encode_path():
            tokens = tokenize(self.table, batch)
            rows = Rows(ids=tokens.rows, data=self.table.data[tokens.rows].clone().requires_grad_(True),
                        special=self.table.special)
            return pack(self.table, tokens, t.float(), rows=rows)

        cases = {"encode": encode_path, "step": lambda: self.condvec_step(self.table, opt, batch, latents, t)}
        times = interleaved(cases, max(2, self.args.repeats // 2), 1)
        e, s = summary(times["encode"]), summary(times["step"])
        share = e["median"] / s["median"]
        self.row(f"encode, batch {self.args.batch}", f"tokenize + gather of touched rows + pack, as % of a training "
                 f"step of the {self.args.unet} UNet at {self.args.latent}×{self.args.latent} latents",
                 f"{share:.2%} (encode {fmt_time(e)}, step {fmt_time(s)})", "≤ 3%", share <= 0.03, encode=e, step=s)

    def step_overhead(self):
        b = self.args.step_batch
        batch = prompts(self.tags, b, 20, seed=4)
        latents, t = self.inputs(b)
        opt = RowSparseAdamW(len(self.table), (1, self.table.width))
        sequence = torch.randn(b, 77, 768)
        cases = {"condvec": lambda: self.condvec_step(self.table, opt, batch, latents, t),
                 "stock": lambda: self.stock_step(sequence, latents, t)}
        times, verdict = until_separated(cases, self.args.repeats, self.args.warmup, self.args.max_repeats)
        c, k = summary(times["condvec"]), summary(times["stock"])
        ratio = c["median"] / k["median"]
        self.row("step overhead", f"batch {b}: condvec step (16 groups, backward to the table, row update) vs stock "
                 "UNet fed a (B, 77, 768) sequence, backward to it", f"{ratio:.3f}× (condvec {fmt_time(c)}, stock "
                 f"{fmt_time(k)}); {verdict}", "≤ 1.00×", ratio <= 1.0, condvec=c, stock=k, verdict=verdict)

    def generation_step(self):
        from unet_patch.processor import cached_kv

        latents = torch.randn(2, 4, self.args.latent, self.args.latent)
        cond = encode(self.table, [prompts(self.tags, 1, 20, seed=5)[0], ""])
        sequence = torch.randn(2, 77, 768)
        with torch.no_grad(), cached_kv(self.unet_condvec):
            cases = {"condvec": lambda: self.unet_condvec(latents, 500, encoder_hidden_states=cond),
                     "stock": lambda: self.unet_stock(latents, 500, encoder_hidden_states=sequence)}
            times, verdict = until_separated(cases, self.args.repeats * 2, self.args.warmup,
                                             self.args.max_repeats * 2)
        c, k = summary(times["condvec"]), summary(times["stock"])
        ratio = c["median"] / k["median"]
        self.row("generation step", "CFG batch 2, condvec with K/V of its constant conditioning cached vs stock fed "
                 "CLIP-shaped sequences", f"{ratio:.3f}× (condvec {fmt_time(c)}, stock {fmt_time(k)}); {verdict}",
                 "≤ 1.00×", ratio <= 1.0, condvec=c, stock=k, verdict=verdict)

    def table_scale(self):
        b = self.args.step_batch
        small = TagTable.create(self.layers, tags=self.tags[:100], groups="layers", pad_to=77, init_std=0.02)
        big = TagTable.create(self.layers, tags=[f"tag {i}" for i in range(self.args.big_tags)], groups="layers",
                              pad_to=77, init_std=0.02)
        batch = prompts(self.tags[:100], b, 20, seed=6)
        latents, t = self.inputs(b)
        opts = {id(small): RowSparseAdamW(len(small), (1, small.width)),
                id(big): RowSparseAdamW(len(big), (1, big.width))}
        cases = {"100": lambda: self.condvec_step(small, opts[id(small)], batch, latents, t),
                 "big": lambda: self.condvec_step(big, opts[id(big)], batch, latents, t)}
        times = interleaved(cases, self.args.repeats, self.args.warmup)
        s, g = summary(times["100"]), summary(times["big"])
        ratio = g["median"] / s["median"]
        self.row("table scale", f"training step, batch {b}, 100 vs {self.args.big_tags:,} tags (16 groups × 768)",
                 f"{ratio:.3f}× (100: {fmt_time(s)}, {self.args.big_tags:,}: {fmt_time(g)})", "≤ 1.05×",
                 ratio <= 1.05, small=s, big=g)

    def vs_textual_inversion(self):
        b = self.args.step_batch
        batch = prompts(self.tags, b, 20, seed=7)
        latents, t = self.inputs(b)
        opt = RowSparseAdamW(len(self.table), (1, self.table.width))
        clip = copy.deepcopy(self.clip)
        embedding = clip.get_input_embeddings().weight
        embedding.requires_grad_(True)
        tokens = torch.randint(0, 49407, (b, 77))
        tokens[:, 5] = 49407  # the learned token

        def ti_step():
            # diffusers' textual_inversion script: gradient to the embedding matrix, only the new token's row kept
            hidden = clip(tokens).last_hidden_state
            pred = self.unet_stock(latents, t, encoder_hidden_states=hidden).sample
            F.mse_loss(pred, latents).backward()
            with torch.no_grad():
                embedding[49407] -= 1e-3 * embedding.grad[49407]
            embedding.grad = None

        cases = {"condvec": lambda: self.condvec_step(self.table, opt, batch, latents, t), "ti": ti_step}
        times = interleaved(cases, self.args.repeats, self.args.warmup)
        c, k = summary(times["condvec"]), summary(times["ti"])
        ratio = c["median"] / k["median"]
        self.row("vs textual inversion", f"batch {b}: condvec step (16 groups) vs TI step (CLIP-L forward + backward "
                 "to the token embedding + the same UNet)", f"{ratio:.3f}× (condvec {fmt_time(c)}, TI {fmt_time(k)})",
                 "< 1.0×", ratio < 1.0, condvec=c, ti=k)

    def threads(self):
        from train.model import build_builtin

        unet = build_builtin("tiny").requires_grad_(False)
        x, seq = torch.randn(8, 3, 32, 32), torch.randn(8, 8, 64)
        default = torch.get_num_threads()

        def step(n):
            def run():
                torch.set_num_threads(n)
                s = seq.clone().requires_grad_(True)
                unet(x, 500, encoder_hidden_states=s).sample.square().mean().backward()
            return run

        counts = sorted({default, 1, 2})
        times = interleaved({n: step(n) for n in counts}, self.args.repeats * 2, self.args.warmup)
        torch.set_num_threads(default)
        parts = ", ".join(f"{n} thread{'s' * (n > 1)}{' (default)' if n == default else ''}: "
                          f"{fmt_time(summary(times[n]))}" for n in counts)
        self.row("CPU threads", "built-in tiny UNet, forward + backward, batch 8, 32 px", parts, "report", None,
                 **{str(n): summary(times[n]) for n in counts})

    def file_size(self):
        for groups in ("single", "layers"):
            table = TagTable.create(self.layers, tags=[f"tag {i}" for i in range(5000)], groups=groups, pad_to=77,
                                    init_std=0.02)
            sizes = []
            with tempfile.TemporaryDirectory() as folder:
                for dtype in ("fp32", "fp16", "bf16"):
                    path = os.path.join(folder, f"{dtype}.safetensors")
                    table.save(path, dtype=dtype)
                    sizes.append(f"{dtype} {os.path.getsize(path) / 1e6:.1f} MB")
            self.row("file size", f"5,000 tags, {len(table.group_names)} group(s) × 768", ", ".join(sizes), "report",
                     None)

    def factor_size(self):
        """5,000 SDXL `layers` concepts (70 groups × 2048) as full rows and factorised at ranks 1–4, fp16 files."""
        from conditioner.factor import FactorRows

        layers, tags = sdxl_layers(), 5000
        table = TagTable.create(layers, groups="layers", pad_to=77)
        groups, dim = len(table.group_names), table.dim
        full = tags * groups * dim * 2 / 1e6
        sizes = [f"full {full:.0f} MB"]
        gen = torch.Generator().manual_seed(0)
        with tempfile.TemporaryDirectory() as folder:
            for rank in (1, 2, 3, 4):
                rows = FactorRows(torch.randn(tags, 1, dim, generator=gen) * 0.02,
                                  torch.randn(tags, 1, groups, rank, generator=gen) * 0.02,
                                  torch.randn(tags, 1, rank, dim, generator=gen) * 0.02)
                factorised = table.replace(tags=[f"tag {i}" for i in range(tags)], data=rows)
                path = os.path.join(folder, f"r{rank}.safetensors")
                factorised.save(path, dtype="fp16")
                sizes.append(f"rank {rank} {os.path.getsize(path) / 1e6:.1f} MB")
                if rank == 3:
                    rank3 = os.path.getsize(path) / 1e6
        self.row("factorised size", "5,000 SDXL `layers` concepts (70 groups × 2048), fp16 file", ", ".join(sizes),
                 "≤ 100 MB", rank3 <= 100)

    def disk(self):
        """``benchmarks.disk_train``'s rows: a 100k-tag SDXL `layers` table and a 1M-tag SD1.5 `single` table
        trained on disk (20 steps), then opened and encoded from the written file."""
        from benchmarks.disk_train import FAMILIES, run_family

        for family in ("sdxl", "sd15"):
            r = run_family(family, FAMILIES[family]["tags"], 20, self.args.disk_dir, keep=False)
            train, opened = r["train"], r["open_trained"]
            self.row("table on disk", f"{r['tags']:,}-tag {family.upper()} `{r['groups']}` table, fp16, "
                     f"{r['table_gib']:.1f} GiB: 20 training steps, 2 checkpoints, the final table streamed out",
                     f"peak RSS {train['peak_rss_gib']:.2f} GiB; step {train['step_s_median']:.2f} s; checkpoint "
                     f"{train['checkpoint_mib']:.0f} MiB; open {opened['open_s'] * 1e3:.0f} ms, encode "
                     f"{opened['encode_s'] * 1e3:.0f} ms", "≤ 8 GiB", train["peak_rss_gib"] <= 8, **r)

    def memory(self):
        for family, tags in (("sd15", self.args.big_tags), ("sdxl", self.args.sdxl_tags)):
            command = [sys.executable, "-m", "benchmarks.speed", "--memory-case", family, "--big-tags", str(tags),
                       "--latent", str(self.args.latent), "--unet", self.args.unet]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            result = json.loads(out)
            gib = result["peak_rss_gib"]
            full = result["table_gib_at_100k"]
            how = (f"{family.upper()} `layers` table of {tags:,} tags ({result['table_gib']:.2f} GiB fp32), "
                   f"row-sparse AdamW, {result['steps']} steps of batch 4 × 20 tags, " + result["unet"])
            value = f"peak RSS {gib:.2f} GiB (optimiser state {result['state_gib'] * 1024:.1f} MiB)"
            if tags != 100_000:
                value += f"; a 100k-tag table alone is {full:.1f} GiB fp32"
            self.row("memory", how, value, "fits 24 GiB", gib <= 24 and (tags == 100_000 or full <= 20), **result)


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB. ``VmHWM`` of the process's own address space: ``ru_maxrss`` would
    carry over the parent's peak across fork + exec on Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB → GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_case(family: str, tags: int, latent: int, unet_kind: str) -> None:
    """Train a big table for a few steps in this (fresh) process; print peak RSS as JSON."""
    if family == "sd15":
        from unet_patch.discover import discover

        unet = build_unet(unet_kind, latent)
        layers = discover(unet)
        unet_note = f"{unet_kind} SD1.5-architecture UNet at {latent}×{latent} latents"
    else:
        layers, unet = sdxl_layers(), None
        unet_note = "no UNet (SDXL's does not fit this machine): table, packing and optimiser only"
    table = TagTable.create(layers, tags=[], groups="layers", pad_to=77)
    table.data = torch.randn(tags, 1, table.width) * 0.02
    table.tags = [f"tag {i}" for i in range(tags)]
    table._index = {name: i for i, name in enumerate(table.tags)}
    if unet is not None:
        from unet_patch.patch import install

        install(unet, table)
    opt = RowSparseAdamW(len(table), (1, table.width))
    steps = 5
    for step in range(steps):
        batch = prompts(table.tags, 4, 20, seed=step)
        token_batch = tokenize(table, batch)
        rows = Rows(ids=token_batch.rows, data=table.data[token_batch.rows].clone().requires_grad_(True),
                    special=table.special)
        t = torch.randint(0, 1000, (4,))
        cond = pack(table, token_batch, t.float(), rows=rows)
        if unet is not None:
            latents = torch.randn(4, 4, latent, latent)
            loss = F.mse_loss(unet(latents, t, encoder_hidden_states=cond).sample, latents)
        else:
            loss = cond.square().mean()
        loss.backward()
        opt.step(table.data, token_batch.rows, rows.data.grad, 1e-3)
    peak = peak_rss_gib()
    state = sum(v.numel() * v.element_size() for v in opt.state_tensors("r").values()) / 2**30
    row_bytes = table.width * 4
    print(json.dumps({"peak_rss_gib": peak, "table_gib": tags * row_bytes / 2**30, "state_gib": state,
                      "table_gib_at_100k": 100_000 * row_bytes / 2**30, "steps": steps, "unet": unet_note}))


def machine() -> str:
    import diffusers
    import transformers

    cpu = "unknown CPU"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return (f"{platform.system()} {platform.machine()}, {cpu}, nproc {os.cpu_count()}, torch threads "
            f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the end;"
            f" Python {platform.python_version()}, torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, transformers {transformers.__version__}")


def markdown(results: list[dict], command: str) -> str:
    lines = [f"`{command}`", "", f"Machine: {machine()}.", "",
             "| figure | how | measured (median, min–max) | goal | met |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['figure']} | {r['how']} | {r['value']} | {r['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per row (encode rows use more)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds discarded before timing")
    parser.add_argument("--max-repeats", type=int, default=40, help="step and generation rows: more rounds (up to "
                        "this many) until the two sides' inter-quartile ranges separate")
    parser.add_argument("--latent", type=int, default=16, help="latent size of the UNet rows (SD1.5: 64)")
    parser.add_argument("--unet", choices=("reduced", "sd15"), default="reduced", help="UNet widths (see above)")
    parser.add_argument("--batch", type=int, default=32, help="batch of the 'encode, batch N' row")
    parser.add_argument("--step-batch", type=int, default=2, help="batch of the training-step rows")
    parser.add_argument("--tags", type=int, default=1000, help="tags of the table of the encode and step rows")
    parser.add_argument("--big-tags", type=int, default=100_000, help="tags of the big table (scale, memory)")
    parser.add_argument("--sdxl-tags", type=int, default=10_000, help="tags of the SDXL memory row (100k: 53 GiB)")
    parser.add_argument("--rows", default="all", help="comma-separated subset: encode1,sdxl,encode32,overhead,"
                        "generation,scale,ti,threads,size,factor,memory,floor,disk (all: every row but disk)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--disk-dir", default=tempfile.gettempdir(), help="where the disk row writes its tables "
                        "(27 GiB, twice)")
    parser.add_argument("--memory-case", choices=("sd15", "sdxl"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        memory_case(args.memory_case, args.big_tags, args.latent, args.unet)
        return 0
    command = "python -m benchmarks.speed " + " ".join(argv if argv is not None else sys.argv[1:])
    bench = Bench(args)
    order = {"encode1": bench.encode_batch1, "sdxl": bench.encode_sdxl,
             "floor": bench.encode_floor, "encode32": bench.encode_batch32,
             "overhead": bench.step_overhead, "generation": bench.generation_step, "scale": bench.table_scale,
             "ti": bench.vs_textual_inversion, "threads": bench.threads, "size": bench.file_size,
             "factor": bench.factor_size, "disk": bench.disk,
             "memory": bench.memory}
    chosen = [r for r in order if r != "disk"] if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    for name in chosen:
        order[name]()
    text = markdown(bench.results, command.strip())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
