"""The trainer under faults: non-finite values, exact EMA, durable checkpoints, configs that must not surprise."""

import os

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from testkit import micro_config

import train.checkpoint as ckpt
from conditioner.errors import CondvecError
from demo.data import generate_demo_dataset
from train.config import load_config
from train.loop import NonFiniteError, Trainer
from train.model import PIXEL_SCHEDULE, SD_SCHEDULE, min_snr_weights
from train.optim import SparseEMA


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_dataset(path, 24, size=32, seed=3)
    return path


def _cfg(demo_dir, out, *extra):
    return micro_config(demo_dir, out, "training.lr=0.05", *extra)


@pytest.mark.parametrize("schedule", [SD_SCHEDULE, PIXEL_SCHEDULE], ids=["sd", "zero-terminal-snr"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 5.0])
def test_min_snr_weights_are_finite_for_every_schedule(schedule, prediction_type, gamma):
    scheduler = DDPMScheduler(**dict(schedule, prediction_type=prediction_type))
    t = torch.arange(scheduler.config.num_train_timesteps)
    weights = min_snr_weights(scheduler, t, gamma)
    assert torch.isfinite(weights).all() and (weights >= 0).all() and (weights <= 1).all()
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    if gamma == 0:
        assert torch.equal(weights, torch.ones_like(weights))
    else:  # the min-SNR formula wherever it is defined
        expected = snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        defined = snr > 0
        torch.testing.assert_close(weights[defined], expected[defined].float(), rtol=1e-4, atol=1e-6)


def test_a_zero_terminal_snr_epsilon_run_stays_finite(demo_dir, tmp_path):
    trainer = Trainer(_cfg(demo_dir, tmp_path / "run", "model.prediction_type=epsilon"))
    assert trainer.noise_scheduler.alphas_cumprod[-1] == 0
    trainer.planner.plan = lambda step, plan=trainer.planner.plan: [
        type(p)(p.index, p.tags, 999, p.flip, p.generator) for p in plan(step)]  # every sample at snr = 0
    m = trainer.train_step()
    assert m["loss"] is not None and torch.isfinite(torch.tensor(m["loss"]))
    assert torch.isfinite(trainer.table.data).all()


def test_non_finite_steps_are_skipped_then_the_run_stops(demo_dir, tmp_path, capsys):
    """A NaN gradient touches no row, moment or UNet weight; after max_bad_steps in a row the run stops."""
    trainer = Trainer(_cfg(demo_dir, tmp_path / "run", "training.train=full", "training.max_bad_steps=2",
                           "training.ema_decay=0.9"))
    trainer.train_step()
    good = trainer.save()
    poison = trainer.unet.conv_out.register_forward_hook(lambda module, args, out: out * float("nan"))

    def tensors():
        rows, special = trainer.param("data"), trainer.param("special")
        return [trainer.table.data, trainer.table.special, rows.optimizer.exp_avg, rows.optimizer.exp_avg_sq,
                rows.optimizer.steps, special.optimizer.exp_avg, rows.ema.average,
                *trainer.unet.state_dict().values(),
                *[v for s in trainer.unet_optimizer.state.values() for v in s.values()]]

    before, counts = [t.clone() for t in tensors()], dict(trainer.table.counts)
    for expected_step in (2, 3):
        m = trainer.train_step()
        assert m["skipped"] and m["loss"] is None and m["step"] == expected_step
        assert all(torch.equal(a, b) for a, b in zip(before, tensors())), "a skipped step changed state"
        assert trainer.table.counts == counts
    out = capsys.readouterr().out
    assert "step 2: non-finite loss (nan) or gradient; tags in the batch: " in out and "step skipped" in out
    with pytest.raises(NonFiniteError, match=r"step 4: .* 3 such steps in a row \(training.max_bad_steps=2\)"):
        trainer.train_step()
    assert ckpt.list_checkpoints(str(tmp_path / "run")) == [good]
    poison.remove()
    m = trainer.train_step()
    assert not m.get("skipped") and trainer.bad_steps == 0
    assert not torch.equal(before[0], trainer.table.data)


def test_sparse_ema_equals_a_dense_ema():
    """Rows updated now and then: the sparse EMA caught up in closed form equals an EMA over every step."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(12, 2, 3, generator=gen)
    sparse, dense, decay = SparseEMA(data, 0.9), data.clone(), 0.9
    for step in range(1, 41):
        rows = torch.nonzero(torch.rand(12, generator=gen) < 0.15).flatten()  # rarely seen rows
        before = data[rows].clone()
        data[rows] += torch.randn(len(rows), 2, 3, generator=gen)
        sparse.update(before, data, rows, step)
        dense = decay * dense + (1 - decay) * data
        if step % 10 == 0:
            torch.testing.assert_close(sparse.read(data, step), dense, rtol=1e-5, atol=1e-6)
    assert (sparse.last < 40).any(), "some rows were not updated at the last step: the catch-up is exercised"


def test_trainer_ema_equals_a_dense_ema(demo_dir, tmp_path):
    trainer = Trainer(_cfg(demo_dir, tmp_path / "run", "training.ema_decay=0.8", "data.tag_dropout=0.5"))
    dense = trainer.table.data.clone()
    for _ in range(5):
        trainer.train_step()
        dense = 0.8 * dense + 0.2 * trainer.table.data
    torch.testing.assert_close(ckpt.ema_table(trainer).data, dense, rtol=1e-5, atol=1e-7)


def test_resume_refuses_a_changed_step_count_when_the_schedule_depends_on_it(demo_dir, tmp_path):
    Trainer(_cfg(demo_dir, tmp_path / "run", "training.steps=2", "training.lr_schedule=cosine")).run()
    with pytest.raises(CondvecError, match=r"the config changed: training.steps \(2 → 4\)"):
        Trainer(_cfg(demo_dir, tmp_path / "run", "training.steps=4", "training.lr_schedule=cosine",
                     "output.resume=latest"))


def test_resaving_a_step_always_leaves_a_checkpoint_of_it(demo_dir, tmp_path, monkeypatch):
    trainer = Trainer(_cfg(demo_dir, tmp_path / "run"))
    trainer.train_step()
    first = trainer.save()
    real = os.replace

    def crash_on_the_new_copy(src, dst):
        if os.path.basename(src).startswith("step-") and ".tmp-" in os.path.basename(src):  # the new folder
            raise OSError("power cut")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_the_new_copy)
    with pytest.raises(OSError, match="power cut"):
        trainer.save()  # the old copy was moved aside, the new one never arrived
    monkeypatch.undo()
    found = ckpt.list_checkpoints(str(tmp_path / "run"))
    assert found == [first + ".prev"]
    resumed = Trainer(_cfg(demo_dir, tmp_path / "run", "output.resume=latest"))
    assert resumed.state.step == 1 and torch.equal(resumed.table.data, trainer.table.data)
    assert resumed.save() == first and ckpt.list_checkpoints(str(tmp_path / "run")) == [first]
    assert not os.path.exists(first + ".prev")


def test_resumed_run_says_so_before_anything_about_the_table(demo_dir, tmp_path, capsys):
    Trainer(_cfg(demo_dir, tmp_path / "run", "training.steps=2")).run()
    capsys.readouterr()
    Trainer(_cfg(demo_dir, tmp_path / "run", "training.steps=3", "output.resume=latest"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resumed from ") and lines[0].endswith("at step 2")
    assert not any("new to the table" in line or line.startswith("table: new") for line in lines)
    assert any(line.startswith("table: ") and "as saved at step 2" in line for line in lines)


def _model_folder(path, scheduler: bool):
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                         layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=4, norm_num_groups=4).save_pretrained(path / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=32).save_pretrained(path / "vae")
    if scheduler:
        DDPMScheduler(**SD_SCHEDULE).save_pretrained(path / "scheduler")
    return path


def test_no_latent_cache_writes_nothing_and_scheduler_folder_is_optional(demo_dir, tmp_path, capsys):
    model = _model_folder(tmp_path / "model", scheduler=False)
    cache = tmp_path / "cache"
    cfg = load_config(None, [f"model.pretrained={model}", f"data.path={demo_dir}", "data.resolution=32",
                             f"data.cache_dir={cache}", "data.cache_latents=false", "training.steps=2",
                             "training.batch_size=4", f"output.dir={tmp_path / 'out'}", "output.progress=false",
                             "output.sample_every=0"])
    trainer = Trainer(cfg)
    assert "has no scheduler/: using Stable Diffusion's noise schedule" in capsys.readouterr().out
    assert trainer.noise_scheduler.config.beta_schedule == SD_SCHEDULE["beta_schedule"]
    before = trainer.table.data.clone()
    trainer.run()
    assert not cache.exists() and not (demo_dir / ".condvec_cache").exists()
    assert not torch.equal(before, trainer.table.data)


def test_config_choice_errors_name_the_key_and_the_choices():
    from train.config import ConfigError

    for override, message in [
        ("training.train=dense", "'training.train' must be one of table, table+kv, full, got 'dense'"),
        ("output.report_to=mlflow", "'output.report_to' must be one of none, tensorboard, wandb, all, got 'mlflow'"),
        ("training.lr_schedule=step", "'training.lr_schedule' must be one of constant, linear, cosine, got 'step'"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(None, ["data.path=d", "model.builtin=micro", override])
        assert str(info.value) == message
