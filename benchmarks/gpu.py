"""Full-size SD1.5 and SDXL UNets on one GPU: condvec's training step against textual inversion and LoRA, and a
30-step CFG generation against the stock UNet loop — time per step and peak memory.

    python -m benchmarks.gpu [--size full|tiny] [--device cuda] [--out benchmarks/results/gpu.md]

Random weights in the real architectures (SD1.5: 512 px, CLIP-L; SDXL: 1024 px, CLIP-L + OpenCLIP-bigG), so
nothing is downloaded; speed and memory do not depend on the weights' values. What each row measures:

- **condvec step**: a ``layers`` table of 1,000 tags (one vector per attn2 layer), 8 tags per prompt, the frozen
  UNet, bf16 autocast; gradients reach only the batch's rows, which the row-sparse AdamW updates. With and without
  gradient checkpointing.
- **textual inversion step**: the same UNet, a trainable token embedding, the frozen text encoder(s) run forward and
  backward every step (SDXL: both encoders).
- **LoRA step**: peft LoRA (rank 4) on every attention projection of the UNet; the text encoder's output is fixed
  (cached), as LoRA trainers do when the text encoder is frozen.
- **distillation step** (``condvec-bootstrap --distill``): a distilled-layout table of 1,000 tags (3 token vectors +
  16 context rows each, one group), batch ``--distill-batch`` (default 32, the CLI's) of 8-tag prompts: the frozen
  UNet's teacher prediction on the pool's CLIP conditioning (cached once per pool, so no text encoder runs per step),
  the student's forward and backward into the batch's rows, the row-sparse AdamW. "Hours per 1,000 tags" is that step
  time × the steps that give 1,000 tags as many occurrences each as the default run on ``models/mini-sd`` gives its
  37 tags (1,500 steps of 32 prompts of 4.5 tags on average: 5,838 each), teacher pool left out.
- **generation**: 30 denoising steps with classifier-free guidance (batch 2 · 1), stock processors on CLIP-shaped
  conditioning against condvec's processors on the packed tags with the constant K/V cached
  (``unet_patch.cached_kv``). VAE decode and prompt encoding are left out of both.

Times are medians over ``--repeats`` after ``--warmup`` calls, synchronised; peak memory is
``torch.cuda.max_memory_allocated`` per row (on CPU: not measured). ``--size tiny`` runs the same code on tiny
stand-ins in a few seconds (the test that keeps this runnable).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

SIZES = {
    "full": {
        "sd15": dict(
            unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280, 1280),
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                      attention_head_dim=8),
            text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       hidden_act="quick_gelu", vocab_size=49408)],
            pixels=512),
        "sdxl": dict(
            unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                      use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
            text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       hidden_act="quick_gelu", vocab_size=49408),
                  dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       hidden_act="gelu", vocab_size=49408, projection_dim=1280)],
            pixels=1024),
    },
    "tiny": {
        "sd15": dict(
            unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(32, 32, 64, 64),
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
                      attention_head_dim=8, norm_num_groups=8),
            text=[dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       hidden_act="quick_gelu", vocab_size=1000)],
            pixels=64),
        "sdxl": dict(
            unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(32, 64, 64),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4),
                      use_linear_projection=True, cross_attention_dim=80, addition_embed_type="text_time",
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 48,
                      norm_num_groups=8),
            text=[dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       hidden_act="quick_gelu", vocab_size=1000),
                  dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                       hidden_act="gelu", vocab_size=1000, projection_dim=48)],
            pixels=64),
    },
}
TAGS, TAGS_PER_PROMPT, TOKENS = 1000, 8, 77


class Clock:
    """Median wall time of a callable and the peak memory it allocated."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> dict:
        cuda = self.device.type == "cuda"
        for _ in range(self.warmup):
            fn()
        self._sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(self.repeats):
            began = time.perf_counter()
            fn()
            self._sync()
            times.append(time.perf_counter() - began)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None
        return {"seconds": statistics.median(times), "spread": [min(times), max(times)], "peak_gib": peak}


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def build(size: str, family: str, device: torch.device):
    """The family's UNet and text encoder(s), random weights, frozen, on ``device``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = SIZES[size][family]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**spec["unet"]).eval().requires_grad_(False)
        encoders = []
        for text in spec["text"]:
            vocab = text["vocab_size"]  # CLIP's special tokens at the top of the vocabulary, as in SD's tokenizers
            config = CLIPTextConfig(max_position_embeddings=TOKENS, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                    pad_token_id=vocab - 1, **text)
            cls = CLIPTextModelWithProjection if "projection_dim" in text else CLIPTextModel
            encoders.append(cls(config).eval().requires_grad_(False))
    return unet, encoders


def _added(unet, batch: int, device, pooled: torch.Tensor | None = None) -> dict | None:
    """SDXL's ``added_cond_kwargs`` (pooled text vector and the six size/crop time ids)."""
    if unet.config.addition_embed_type != "text_time":
        return None
    width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    if pooled is None:
        pooled = torch.randn(batch, width, device=device)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device=device).expand(batch, -1)
    return {"text_embeds": pooled, "time_ids": time_ids}


def _noisy(unet, batch: int, device):
    c, s = unet.config.in_channels, unet.config.sample_size
    latents, noise = torch.randn(batch, c, s, s, device=device), torch.randn(batch, c, s, s, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    return latents + noise, t, noise


def condvec_step(unet, device, batch: int):
    """A callable: one condvec training step (gather rows, packed forward, backward into the rows, sparse AdamW)."""
    from conditioner import TagTable
    from conditioner.encode import Rows, pack, tokenize
    from train.optim import RowSparseAdamW
    from unet_patch import discover, patched

    table = TagTable.create(discover(unet), groups="layers")
    table.add_tags([f"tag{i}" for i in range(TAGS)], init="normal", std=0.02)
    table.to(device)
    width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim \
        if unet.config.addition_embed_type == "text_time" else 0
    pooled = torch.randn(TAGS, width, device=device) if width else None
    opt = RowSparseAdamW(len(table), (table.num_anchors, table.width), device=device)
    gen = torch.Generator().manual_seed(0)

    def step():
        prompts = [", ".join(f"tag{int(i)}" for i in torch.randint(0, TAGS, (TAGS_PER_PROMPT,), generator=gen))
                   for _ in range(batch)]
        tokens = tokenize(table, prompts)
        ids = tokens.rows.to(device)
        rows = Rows(ids=ids, data=table.data[ids].clone().requires_grad_(True), special=table.special)
        noisy, t, noise = _noisy(unet, batch, device)
        added = None
        if pooled is not None:
            batch_pooled = pooled[ids].mean(0, keepdim=True).expand(batch, -1).clone().requires_grad_(True)
            added = _added(unet, batch, device, batch_pooled)
        with patched(unet, table):  # backward inside: gradient checkpointing re-runs the forward
            with _autocast(device):
                pred = unet(noisy, t, encoder_hidden_states=pack(table, tokens, t.float(), rows=rows),
                            added_cond_kwargs=added).sample
            F.mse_loss(pred.float(), noise).backward()
        opt.step(table.data, ids, rows.data.grad, 1e-3)

    return step


#: Occurrences of each tag in the default distillation of ``models/mini-sd``: 1,500 steps × 32 prompts × 4.5 tags per
#: prompt (1 … 8, uniform) / 37 tags.
DISTILL_EXPOSURE = 1500 * 32 * 4.5 / 37


def distillation_step(unet, device, batch: int):
    """A callable: one distillation step (teacher prediction, student forward and backward into the rows, AdamW)."""
    from conditioner import Layout, TagTable
    from conditioner.encode import Rows, pack, tokenize
    from train.optim import RowSparseAdamW
    from unet_patch import discover, patched

    layout = Layout.distilled()
    table = TagTable.create(discover(unet), layout=layout)
    table.add_tags([f"tag{i}" for i in range(TAGS)], init="normal", std=0.02, vectors=layout.vectors)
    table.to(device)
    width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim \
        if unet.config.addition_embed_type == "text_time" else 0
    pooled = torch.randn(len(table), width, device=device) if width else None
    opt = RowSparseAdamW(len(table), (table.num_anchors, table.width), device=device)
    teacher_states = torch.randn(batch, TOKENS, unet.config.cross_attention_dim, device=device)  # the pool's
    gen = torch.Generator().manual_seed(0)

    def step():
        prompts = [", ".join(f"tag{int(i)}" for i in torch.randperm(TAGS, generator=gen)[:TAGS_PER_PROMPT])
                   for _ in range(batch)]
        tokens = tokenize(table, prompts)
        ids = tokens.rows.to(device)
        rows = Rows(ids=ids, data=table.data[ids].clone().requires_grad_(True), special=table.special)
        noisy, t, _ = _noisy(unet, batch, device)
        with torch.no_grad(), _autocast(device):
            target = unet(noisy, t, encoder_hidden_states=teacher_states,
                          added_cond_kwargs=_added(unet, batch, device)).sample.float()
        added = None
        if pooled is not None:
            added = _added(unet, batch, device, pooled[ids].mean(0, keepdim=True).expand(batch, -1).clone())
        with patched(unet, table), _autocast(device):
            pred = unet(noisy, t, encoder_hidden_states=pack(table, tokens, rows=rows), added_cond_kwargs=added).sample
        F.mse_loss(pred.float(), target).backward()
        opt.step(table.data, ids, rows.data.grad, 2e-2)

    return step


def textual_inversion_step(unet, encoders, device, batch: int):
    """A callable: one textual-inversion step (trainable token embeddings, text encoders forward and backward)."""
    embeddings = [e.get_input_embeddings() for e in encoders]
    for e in embeddings:
        e.weight.requires_grad_(True)
    params = [e.weight for e in embeddings]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, embeddings[0].num_embeddings, (batch, TOKENS), generator=gen).to(device)
        noisy, t, noise = _noisy(unet, batch, device)
        with _autocast(device):
            outputs = [e(ids, output_hidden_states=True) for e in encoders]
            states = torch.cat([o.hidden_states[-2] if len(encoders) > 1 else o.last_hidden_state
                                for o in outputs], -1)  # SDXL reads the penultimate layer of both
            pooled = outputs[-1].text_embeds if len(encoders) > 1 else None
            pred = unet(noisy, t, encoder_hidden_states=states, added_cond_kwargs=_added(unet, batch, device,
                                                                                       pooled)).sample
        F.mse_loss(pred.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, lambda: [e.weight.requires_grad_(False) for e in embeddings]


def lora_step(unet, device, batch: int, rank: int = 4):
    """A callable: one LoRA step (peft rank-``rank`` adapters on every attention projection; cached text states)."""
    from peft import LoraConfig

    lora = copy.deepcopy(unet)
    lora.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for n, p in lora.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=1e-4)
    states = torch.randn(batch, TOKENS, unet.config.cross_attention_dim, device=device)

    def step():
        noisy, t, noise = _noisy(lora, batch, device)
        with _autocast(device):
            pred = lora(noisy, t, encoder_hidden_states=states, added_cond_kwargs=_added(lora, batch, device)).sample
        F.mse_loss(pred.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


@torch.no_grad()
def generation(unet, device, condvec: bool, steps: int = 30):
    """A callable: ``steps`` CFG denoising steps, stock conditioning or condvec's packed tags (K/V cached)."""
    from diffusers import DDIMScheduler

    from conditioner import TagTable, encode
    from unet_patch import discover, patched
    from unet_patch.processor import cached_kv

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    added = _added(unet, 2, device)
    if condvec:
        table = TagTable.create(discover(unet), groups="layers")
        table.add_tags([f"tag{i}" for i in range(TAGS)], init="normal", std=0.02)
        table.to(device)
        cond = encode(table, [", ".join(f"tag{i}" for i in range(TAGS_PER_PROMPT)), ""], pad_to=TOKENS)
        context = lambda: (patched(unet, table), cached_kv(unet))  # noqa: E731
    else:
        cond = torch.randn(2, TOKENS, unet.config.cross_attention_dim, device=device)
        context = lambda: (nullcontext(), nullcontext())  # noqa: E731

    def run():
        scheduler.set_timesteps(steps)
        x = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                        device=device)
        first, second = context()
        with first, second, _autocast(device):
            for t in scheduler.timesteps:
                out = unet(torch.cat([x, x]), t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
                text, uncond = out.float().chunk(2)
                x = scheduler.step(uncond + 5.0 * (text - uncond), t, x).prev_sample

    return run


def measure(size: str, device: torch.device, warmup: int, repeats: int, batch: int,
            distill_batch: int = 32) -> list[dict]:
    """Every row of the table, for both families."""
    clock, rows = Clock(device, warmup, repeats), []
    for family in ("sd15", "sdxl"):
        unet, encoders = build(size, family, device)
        pixels = SIZES[size][family]["pixels"]
        label = f"{family} {pixels} px"
        for checkpointing in (False, True):
            if checkpointing:
                unet.enable_gradient_checkpointing()
            unet.train(checkpointing)  # diffusers checkpoints only in training mode
            rows.append({"model": label, "what": "condvec step" + (" (grad. checkpointing)" if checkpointing
                                                                   else ""), **clock(condvec_step(unet, device,
                                                                                                  batch))})
            if checkpointing:
                unet.disable_gradient_checkpointing()
        unet.eval()
        row = clock(distillation_step(unet, device, distill_batch))
        steps = DISTILL_EXPOSURE * 1000 / (distill_batch * (1 + TAGS_PER_PROMPT) / 2)
        rows.append({"model": label, "what": f"distillation step (batch {distill_batch}; "
                     f"{row['seconds'] * steps / 3600:.2f} h per 1,000 tags)", **row})
        step, release = textual_inversion_step(unet, encoders, device, batch)
        rows.append({"model": label, "what": "textual inversion step", **clock(step)})
        release()
        step, params = lora_step(unet, device, batch)
        rows.append({"model": label, "what": f"LoRA step (rank 4, {params:,} params)", **clock(step)})
        for condvec in (False, True):
            rows.append({"model": label, "what": "30-step CFG generation, " + ("condvec (K/V cached)" if condvec
                                                                              else "stock"),
                         **clock(generation(unet, device, condvec))})
        del unet, encoders
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], device: torch.device, batch: int, command: str) -> str:
    """The rows as a markdown table, with the device and the command."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    lines = [f"Device: {name}; torch {torch.__version__}; batch {batch}; bf16 autocast; `{command}`", "",
             "| model | measurement | seconds (median) | spread | peak memory |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        peak = "not measured (CPU)" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
        lines.append(f"| {r['model']} | {r['what']} | {r['seconds']:.4f} | {r['spread'][0]:.4f}–{r['spread'][1]:.4f} "
                     f"| {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--distill-batch", type=int, default=32, help="prompts per distillation step")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.md"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device: pass --device cpu (with --size tiny)")
    command = "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    began = time.perf_counter()
    table = markdown(measure(args.size, device, args.warmup, args.repeats, args.batch, args.distill_batch), device,
                     args.batch,
                     command.strip())
    table += f"\nWall time: {time.perf_counter() - began:.0f} s.\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
