"""Scale features: optimiser and EMA state only for touched rows (resumed exactly), fp16/bf16 table storage."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conditioner import TagTable
from conditioner.errors import CondvecError
from conditioner.layout import LayerSpec
from train.optim import RowSparseAdamW, SparseEMA


class DenseReferenceAdamW:
    """The row-wise AdamW with dense moments for every row: what RowSparseAdamW must equal bit for bit."""

    def __init__(self, num_rows, row_shape, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.m, self.v = torch.zeros(num_rows, *row_shape), torch.zeros(num_rows, *row_shape)
        self.steps = torch.zeros(num_rows, dtype=torch.long)

    def step(self, data, rows, grad, lr):
        beta1, beta2 = self.betas
        steps = self.steps[rows] + 1
        self.steps[rows] = steps
        m = self.m[rows].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = self.v[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.m[rows], self.v[rows] = m, v
        shape = (-1,) + (1,) * (grad.dim() - 1)
        bias1 = (1 - beta1 ** steps.to(torch.float64)).to(grad.dtype).view(shape)
        bias2 = (1 - beta2 ** steps.to(torch.float64)).to(grad.dtype).view(shape)
        p = data[rows]
        if self.weight_decay:
            p.mul_(1 - lr * self.weight_decay)
        p.addcdiv_(m / bias1, (v / bias2).sqrt_().add_(self.eps), value=-lr)
        data[rows] = p


def _batches(num_rows, count, seed, per_step=5):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        rows = torch.unique(torch.randint(0, num_rows, (per_step,), generator=gen))
        yield rows, torch.randn(rows.numel(), 2, 3, generator=gen)


def test_adamw_state_exists_only_for_touched_rows_and_equals_dense_state():
    """100k rows, a few touched: moments are allocated for those rows only, and the updates equal dense AdamW's."""
    num_rows = 100_000
    data = torch.randn(num_rows, 2, 3)
    reference_data = data.clone()
    opt, ref = RowSparseAdamW(num_rows, (2, 3), weight_decay=0.1), DenseReferenceAdamW(num_rows, (2, 3), 0.1)
    touched = set()
    for rows, grad in _batches(num_rows, 12, seed=0):
        opt.step(data, rows, grad, lr=0.05)
        ref.step(reference_data, rows, grad, lr=0.05)
        touched |= set(rows.tolist())
    assert opt.allocated_rows == len(touched) < 100
    capacity = opt.state_tensors("rows")["rows.exp_avg"].shape[0]
    assert capacity == len(touched), "saved state covers exactly the touched rows"
    assert opt._slots.store["exp_avg"].shape[0] < 4 * len(touched) + 16, "storage grew with touches, not the table"
    assert torch.equal(data, reference_data)
    assert torch.equal(opt.exp_avg, ref.m) and torch.equal(opt.exp_avg_sq, ref.v) and torch.equal(opt.steps, ref.steps)


def test_adamw_lazy_state_resumes_bit_identically(tmp_path):
    """Save the state mid-run through safetensors, load it into a fresh optimiser: both continue identically."""
    num_rows = 500
    data = torch.randn(num_rows, 2, 3)
    opt = RowSparseAdamW(num_rows, (2, 3), weight_decay=0.05)
    batches = list(_batches(num_rows, 20, seed=1, per_step=30))
    for rows, grad in batches[:10]:
        opt.step(data, rows, grad, lr=0.02)
    path = str(tmp_path / "state.safetensors")
    save_file({k: v.contiguous() for k, v in opt.state_tensors("rows").items()}, path)
    resumed, resumed_data = RowSparseAdamW(num_rows, (2, 3), weight_decay=0.05), data.clone()
    resumed.load_state_tensors(load_file(path), "rows")
    assert resumed.allocated_rows == opt.allocated_rows
    for rows, grad in batches[10:]:
        opt.step(data, rows, grad, lr=0.02)
        resumed.step(resumed_data, rows, grad, lr=0.02)
    assert torch.equal(data, resumed_data)
    for name, tensor in opt.state_tensors("rows").items():
        assert torch.equal(tensor, resumed.state_tensors("rows")[name]), name


def test_adamw_loads_a_dense_state():
    """A checkpoint written with dense moments (no ``rows`` entry) continues exactly."""
    num_rows = 40
    data = torch.randn(num_rows, 2, 3)
    ref = DenseReferenceAdamW(num_rows, (2, 3))
    batches = list(_batches(num_rows, 8, seed=2))
    for rows, grad in batches[:4]:
        ref.step(data, rows, grad, lr=0.1)
    opt, ours = RowSparseAdamW(num_rows, (2, 3)), data.clone()
    opt.load_state_tensors({"rows.exp_avg": ref.m.clone(), "rows.exp_avg_sq": ref.v.clone(),
                            "rows.steps": ref.steps.clone()}, "rows")
    for rows, grad in batches[4:]:
        ref.step(data, rows, grad, lr=0.1)
        opt.step(ours, rows, grad, lr=0.1)
    assert torch.equal(ours, data)


def test_sparse_ema_keeps_averages_of_touched_rows_only_and_resumes_exactly():
    num_rows = 10_000
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(num_rows, 2, 3, generator=gen)
    ema, dense = SparseEMA(data, 0.8), data.clone()
    steps = []
    for _ in range(12):
        rows = torch.unique(torch.randint(0, 50, (6,), generator=gen))
        steps.append((rows, torch.randn(rows.numel(), 2, 3, generator=gen)))
    for step, (rows, delta) in enumerate(steps[:6], start=1):
        before = data[rows].clone()
        data[rows] += delta
        ema.update(before, data, rows, step)
        dense = 0.8 * dense + 0.2 * data
    assert ema.allocated_rows <= 50 and ema.average.shape[0] == ema.allocated_rows
    torch.testing.assert_close(ema.read(data, 6), dense, rtol=1e-5, atol=1e-6)
    resumed = SparseEMA(data, 0.8)
    resumed.load_state_tensors({k: v.clone() for k, v in ema.state_tensors("ema").items()}, "ema")
    for step, (rows, delta) in enumerate(steps[6:], start=7):
        before = data[rows].clone()
        data[rows] += delta
        ema.update(before, data, rows, step)
        resumed.update(before, data, rows, step)
    assert torch.equal(ema.read(data, 12), resumed.read(data, 12))


def _table(tags=50):
    layers = [LayerSpec(f"down.{i}.attn2", f"d{i}", f"down.{i}", 16, 16, 2) for i in range(3)]
    table = TagTable.create(layers, tags=[f"tag {i}" for i in range(tags)], groups="layers", init_std=0.5, seed=1)
    table.set_value_source("tag 3", torch.randn(1, table.width))
    return table


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                                 (torch.bfloat16, torch.bfloat16), ("fp32", torch.float32)])
def test_table_storage_dtype_round_trips(tmp_path, dtype, torch_dtype):
    """A table saved in fp16/bf16 loads as fp32 holding exactly the rounded values, at half the file size."""
    table = _table()
    full, small = str(tmp_path / "full.safetensors"), str(tmp_path / "small.safetensors")
    table.save(full)
    table.save(small, dtype=dtype)
    stored = load_file(small)
    assert stored["data"].dtype == torch_dtype and stored["special"].dtype == torch_dtype
    loaded = TagTable.load(small)
    assert loaded.data.dtype == torch.float32 and loaded.special.dtype == torch.float32
    for name in ("data", "special"):
        assert torch.equal(getattr(loaded, name), getattr(table, name).to(torch_dtype).float()), name
    assert torch.equal(loaded.values["tag 3"], table.values["tag 3"].to(torch_dtype).float())
    assert loaded.metadata() == table.metadata()
    if torch_dtype != torch.float32:
        assert os.path.getsize(small) < 0.6 * os.path.getsize(full)
        assert not torch.equal(loaded.data, table.data), "rounding happened: the check above is not vacuous"


def test_table_storage_dtype_errors(tmp_path):
    table = _table()
    with pytest.raises(CondvecError, match="storage dtype 'int8' is not supported: use one of fp32, fp16, bf16"):
        table.save(str(tmp_path / "t.safetensors"), dtype="int8")
    table.data[0] = 1e6
    with pytest.raises(CondvecError, match="beyond fp16's range"):
        table.save(str(tmp_path / "t.safetensors"), dtype="fp16")
    table.save(str(tmp_path / "t.safetensors"), dtype="bf16")
    assert TagTable.load(str(tmp_path / "t.safetensors")).data[0].max() > 9e5


def test_latent_cache_encodes_in_batches(tmp_path):
    """prepare() encodes the images of a bucket in few VAE calls, and the latents equal one-at-a-time encodes."""
    from diffusers import AutoencoderKL

    from demo.data import generate_demo_dataset
    from train.cache import LatentCache, LatentEncoder
    from train.data import assign_buckets, scan_dataset

    generate_demo_dataset(tmp_path / "data", 6)
    items = scan_dataset(str(tmp_path / "data"))
    assign_buckets(items, 32, step=8)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).eval()
    cache = LatentCache(vae, str(tmp_path / "cache"))
    calls = []
    hook = vae.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    assert cache.prepare(items, flips=True, progress=False) == 12
    hook.remove()
    assert sum(calls) == 12 and len(calls) == 2, f"12 entries in batches of 8: {calls}"
    single = LatentEncoder(vae)
    for item in items:
        for flip in (False, True):
            torch.testing.assert_close(cache.get(item, flip), single.get(item, flip), rtol=1e-5, atol=1e-5)


def test_sample_grid_is_one_pipeline_call_per_prompt_with_every_seed(tmp_path, monkeypatch):
    """All seeds of a prompt go through one pipeline call, and each image is the one its seed gives alone."""
    from diffusers import DDPMScheduler
    from omegaconf import OmegaConf

    from train import sampling
    from train.model import PIXEL_SCHEDULE, build_builtin
    from unet_patch.discover import table_for_unet

    unet = build_builtin("micro", seed=0).eval()
    table = table_for_unet(unet, tags=["red", "blue"], init_std=0.5)
    scheduler = DDPMScheduler(num_train_timesteps=1000, **PIXEL_SCHEDULE)
    output = OmegaConf.create({"sample_prompts": ["red", "blue"], "sample_seeds": [3, 4, 5], "sample_steps": 3,
                               "sample_guidance": 2.0, "dir": str(tmp_path), "sample_upscale": 1})
    seen, grids = [], []
    real_pipeline = sampling._pipeline

    def counting_pipeline(*args):
        pipe = real_pipeline(*args)
        original = pipe.__call__

        class Counted:
            def __call__(self, prompt, **kwargs):
                seen.append((prompt, kwargs.get("num_images_per_prompt", 1)))
                return original(prompt, **kwargs)

        return Counted()

    monkeypatch.setattr(sampling, "_pipeline", counting_pipeline)
    monkeypatch.setattr(sampling, "labelled_grid", lambda rows, *a, **k: grids.append(rows) or _Saved())
    assert sampling.sample_grid(OmegaConf.create({"output": output}), unet, None, table, scheduler, "t")
    assert seen == [("red", 3), ("blue", 3)]
    alone = real_pipeline(unet, None, table, scheduler)("blue", num_inference_steps=3, guidance_scale=2.0,
                                                         generator=torch.Generator().manual_seed(4)).images[0]
    batched = torch.from_numpy(np.asarray(grids[0][1][1])).float()  # prompt "blue", seed 4
    assert torch.allclose(batched, torch.from_numpy(np.asarray(alone)).float(), atol=2.0)


class _Saved:
    def save(self, path):
        pass
