import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from testkit import micro_config, run_until_killed

from conditioner import TagTable
from conditioner.errors import CondvecError
from demo.data import generate_demo_dataset
from train.config import load_config
from train.loop import Trainer


@pytest.fixture(scope="module")
def empty_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text("{}\n")
    return str(path)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_dataset(path, 48, size=32, seed=3)
    return path


def _cfg(demo_dir, out, *extra):
    return micro_config(demo_dir, out, "training.lr=0.05", "training.weight_decay=0.1", "output.keep_last=2", *extra,
                        steps=6)


def test_step_changes_only_rows_of_tags_in_the_batch(demo_dir, tmp_path):
    """Invariant 3 in a real training step: AdamW momentum and weight decay never reach absent rows."""
    trainer = Trainer(_cfg(demo_dir, tmp_path / "run", "data.tag_dropout=0.3"))
    for _ in range(3):  # build up momentum on many rows first
        trainer.train_step()
    before = trainer.table.data.clone()
    step = trainer.state.step
    plans = trainer.planner.plan(step)
    present = {trainer.table.row(t.name) for p in plans for t in p.tags}
    trainer.train_step()
    after = trainer.table.data
    for r in range(len(trainer.table)):
        moved = not torch.equal(before[r], after[r])
        assert moved == (r in present), trainer.table.tags[r]
    assert 0 < len(present) < len(trainer.table)


def test_resume_after_kill_equals_uninterrupted_run(demo_dir, tmp_path):
    """Invariant 7: kill after a checkpoint, resume=latest, and the result is bit-identical."""
    extra = ["training.grad_accum=2", "training.ema_decay=0.9", "data.caption_dropout=0.2", "data.flip=true"]
    full = Trainer(_cfg(demo_dir, tmp_path / "full", *extra)).run()

    killed = Trainer(_cfg(demo_dir, tmp_path / "killed", *extra))
    run_until_killed(killed, 5)
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["step-0000002", "step-0000004"]
    resumed = Trainer(_cfg(demo_dir, tmp_path / "killed", *extra, "output.resume=latest"))
    assert resumed.state.step == 4
    result = resumed.run()

    a, b = TagTable.load(full["table"]), TagTable.load(result["table"])
    assert torch.equal(a.data, b.data) and torch.equal(a.special, b.special)
    assert a.counts == b.counts and sum(a.counts.values()) > 0
    ema_a = TagTable.load(full["table_ema"]).data
    assert torch.equal(ema_a, TagTable.load(result["table_ema"]).data)
    lines_a = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    lines_b = [json.loads(x) for x in open(tmp_path / "killed" / "metrics.jsonl")]
    assert [m["loss"] for m in lines_a] == [m["loss"] for m in lines_b] and len(lines_a) == 6


def test_full_unet_training_resumes_exactly(demo_dir, tmp_path):
    extra = ["training.train=full", "training.steps=4", "training.lr_schedule=cosine", "training.warmup_steps=1"]
    full = Trainer(_cfg(demo_dir, tmp_path / "full", *extra)).run()
    # same schedule: resume a run whose total is 4 from the step-2 checkpoint of a run configured identically
    part = Trainer(_cfg(demo_dir, tmp_path / "part", *extra))
    part.train_step()
    part.train_step()
    part.save()
    resumed = Trainer(_cfg(demo_dir, tmp_path / "part", *extra, "output.resume=latest")).run()
    w_full = load_file(os.path.join(full["model"], "unet", "diffusion_pytorch_model.safetensors"))
    w_res = load_file(os.path.join(resumed["model"], "unet", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert torch.equal(TagTable.load(full["table"]).data, TagTable.load(resumed["table"]).data)


def test_unet_ema_resumes_exactly_and_is_what_the_model_exports(demo_dir, tmp_path):
    extra = ["training.train=full", "training.steps=4", "training.ema_unet_decay=0.9", "training.lr_unet=0.01"]
    full = Trainer(_cfg(demo_dir, tmp_path / "full", *extra))
    result = full.run()
    part = Trainer(_cfg(demo_dir, tmp_path / "part", *extra))
    part.train_step()
    part.train_step()
    part.save()
    resumed = Trainer(_cfg(demo_dir, tmp_path / "part", *extra, "output.resume=latest"))
    assert resumed.unet_ema.optimization_step == 2
    resumed.run()
    for a, b in zip(full.unet_ema.shadow_params, resumed.unet_ema.shadow_params):
        assert torch.equal(a, b)
    exported = load_file(os.path.join(result["model"], "unet", "diffusion_pytorch_model.safetensors"))
    names = [n for n, p in full.unet.named_parameters() if p.requires_grad]
    averaged = dict(zip(names, full.unet_ema.shadow_params))
    assert all(torch.equal(exported[n], averaged[n]) for n in names)  # the model/ folder holds the EMA weights
    raw = dict(full.unet.named_parameters())
    assert any(not torch.equal(averaged[n], raw[n].detach()) for n in names)  # which differ from the raw ones


def test_crash_while_saving_keeps_last_good_checkpoint(demo_dir, tmp_path, monkeypatch):
    trainer = Trainer(_cfg(demo_dir, tmp_path / "run"))
    trainer.train_step()
    good = trainer.save()
    trainer.train_step()
    import train.checkpoint as ckpt

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError):
        trainer.save()
    assert ckpt.list_checkpoints(str(tmp_path / "run")) == [good]
    assert not [n for n in os.listdir(tmp_path / "run" / "checkpoints") if ".tmp-" in n]
    resumed = Trainer(_cfg(demo_dir, tmp_path / "run", "output.resume=latest"))
    assert resumed.state.step == 1


def test_checkpoints_are_not_pickles(demo_dir, tmp_path):
    Trainer(_cfg(demo_dir, tmp_path / "run", "training.steps=2", "training.train=table+kv")).run()
    folder = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert sorted(os.listdir(folder)) == ["state.json", "state.safetensors", "table.safetensors", "unet.safetensors"]
    for name in os.listdir(folder):
        raw = (folder / name).read_bytes()
        if name.endswith(".json"):
            json.loads(raw.decode())
        else:  # safetensors: an 8-byte little-endian header length, then a JSON header — never a zip or a pickle
            size = int.from_bytes(raw[:8], "little")
            assert json.loads(raw[8:8 + size].decode()), f"{name} has no safetensors header"
            load_file(folder / name)


def test_run_outputs_and_new_tags_reported(demo_dir, tmp_path, capsys, empty_yaml):
    from train.cli import main

    code = main([empty_yaml, f"data.path={demo_dir}", "model.builtin=micro", "data.resolution=16",
                 "training.steps=3", "training.batch_size=4", f"output.dir={tmp_path / 'out'}",
                 "output.progress=false", "output.sample_every=0", "output.sample_steps=2",
                 "output.sample_prompts=[red circle]", "output.sample_seeds=[0,1]"])
    out = capsys.readouterr().out
    assert code == 0
    assert "new to the table" in out and "condvec-merge list" in out
    for name in ("table.safetensors", "loss.png", "metrics.jsonl", "config.yaml", "samples/step-0000003.png"):
        assert (tmp_path / "out" / name).exists(), name
    table = TagTable.load(tmp_path / "out" / "table.safetensors")
    assert "red circle" in table and sum(table.counts.values()) > 0


def test_unknown_sample_prompt_tag_is_a_clear_error(demo_dir, tmp_path, capsys, empty_yaml):
    from train.cli import main

    code = main([empty_yaml, f"data.path={demo_dir}", "model.builtin=micro", "data.resolution=16",
                 f"output.dir={tmp_path / 'out'}", "output.sample_prompts=[red circel]"])
    err = capsys.readouterr().err
    assert code == 2
    assert "output.sample_prompts 'red circel': unknown tag 'red circel' (did you mean 'red circle'" in err
    assert len(err.strip().splitlines()) == 1


def test_two_processes_equal_one_process(demo_dir, tmp_path, empty_yaml):
    """torchrun --nproc_per_node 2 on CPU (gloo) gives the same table as one process with the same global batch.

    The two runs differ only in the order the gradients are summed (per rank, then all-reduced), so they agree up to
    float32 rounding of those sums. With ``training.eps=1`` the AdamW update ``lr * m / (sqrt(v) + 1)`` is
    Lipschitz in the gradient (slope <= lr), so that rounding (relative ~2**-24 per addition, a few hundred additions)
    moves each parameter by a small multiple of 2**-24 of the distance training moved it; the tolerance is 1e-4 of
    that distance, far above the rounding and far below any real difference (one sample missing from a rank's
    share changes the result by a few percent of it). With the default eps=1e-8, an element whose gradient is at the
    rounding level can flip the sign of its first Adam step, a difference of 2 * lr that no tolerance derived from
    the arithmetic can allow.
    """
    args = [f"data.path={demo_dir}", "model.builtin=micro", "data.resolution=16", "data.bucketing=false",
            "training.steps=3", "training.batch_size=4", "training.lr=0.05", "training.eps=1.0",
            "output.sample_every=0", "output.progress=false", "training.train=table+kv"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "train.cli", empty_yaml, *args, f"output.dir={tmp_path / 'one'}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", "-m", "train.cli", empty_yaml, *args,
                          f"output.dir={tmp_path / 'two'}"], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = TagTable.load(tmp_path / "one" / "table.safetensors"), TagTable.load(tmp_path / "two" / "table.safetensors")
    assert a.tags == b.tags and a.counts == b.counts
    begin = Trainer(load_config(empty_yaml, [*args, f"output.dir={tmp_path / 'start'}"]))
    start, unet0 = begin.table, {k: v.detach().clone() for k, v in begin.unet.state_dict().items()}
    assert start.tags == a.tags
    moved = (a.data - start.data).abs().max().item()
    assert moved > 1e-6, "the compared tables did train"
    torch.testing.assert_close(a.data, b.data, rtol=0, atol=1e-4 * moved)
    ua = load_file(tmp_path / "one" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    ub = load_file(tmp_path / "two" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    trained = [k for k in ua if not torch.equal(ua[k], unet0[k])]
    assert trained, "the UNet's K/V projections did train"
    for k in ua:
        torch.testing.assert_close(ua[k], ub[k], rtol=0, atol=1e-4 * (ua[k] - unet0[k]).abs().max().item())


def test_single_file_unet_with_local_config(tmp_path):
    from safetensors.torch import save_file

    from train.model import build_builtin, load_base

    unet = build_builtin("micro", seed=5)
    unet.save_config(tmp_path / "cfg")
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / "unet.safetensors")
    cfg = load_config(None, ["data.path=x", f"model.single_file={tmp_path / 'unet.safetensors'}",
                             f"model.single_file_config={tmp_path / 'cfg'}"])
    base = load_base(cfg.model)
    assert base.vae is None and base.table is None and base.text is None and base.name == "unet.safetensors"
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), base.unet.state_dict().values()))
    save_file({"conv_in.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    cfg = load_config(None, ["data.path=x", f"model.single_file={tmp_path / 'bad.safetensors'}",
                             f"model.single_file_config={tmp_path / 'cfg'}"])
    with pytest.raises(CondvecError, match="cannot load .*bad.safetensors with .*config.json"):
        load_base(cfg.model)


def test_v_prediction_and_gradient_checkpointing(demo_dir, tmp_path):
    """Checkpointing recomputes the blocks' forward in backward (twice the calls) and changes no result."""
    plain = Trainer(_cfg(demo_dir, tmp_path / "a", "training.train=full", "model.prediction_type=v_prediction"))
    ckpt = Trainer(_cfg(demo_dir, tmp_path / "b", "training.train=full", "model.prediction_type=v_prediction",
                        "training.gradient_checkpointing=true"))
    assert plain.prediction_type == "v_prediction"
    calls = {"plain": 0, "ckpt": 0}
    for name, trainer in (("plain", plain), ("ckpt", ckpt)):
        resnet = trainer.unet.down_blocks[0].resnets[0]
        resnet.register_forward_pre_hook(lambda *args, key=name: calls.__setitem__(key, calls[key] + 1))
    for _ in range(2):
        m1, m2 = plain.train_step(), ckpt.train_step()
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    assert calls == {"plain": 2, "ckpt": 4}, calls
    torch.testing.assert_close(plain.table.data, ckpt.table.data, rtol=1e-5, atol=1e-7)


def test_fresh_run_never_overwrites_and_resume_refuses_a_changed_config(demo_dir, tmp_path):
    Trainer(_cfg(demo_dir, tmp_path / "run", "training.steps=2")).run()
    with pytest.raises(CondvecError, match=r"already holds a run \(checkpoints, .*\): continue it with "
                                         r"output.resume=latest, replace it with output.overwrite=true"):
        Trainer(_cfg(demo_dir, tmp_path / "run", "training.steps=2"))
    with pytest.raises(CondvecError, match=r"the config changed: training.lr \(0.05 → 0.1\)"):
        Trainer(_cfg(demo_dir, tmp_path / "run", "training.steps=4", "training.lr=0.1", "output.resume=latest"))
    resumed = Trainer(_cfg(demo_dir, tmp_path / "run", "training.steps=4", "output.resume=latest"))
    assert resumed.state.step == 2


def test_latent_space_run_with_vae_and_cache(demo_dir, tmp_path):
    """A diffusers model folder with a VAE: latents are cached on disk and the run trains in latent space."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    model = tmp_path / "model"
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                         layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=4, norm_num_groups=4).save_pretrained(model / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=32).save_pretrained(model / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        model / "scheduler")
    cache = tmp_path / "cache"
    cfg = load_config(None, [f"model.pretrained={model}", f"data.path={demo_dir}", "data.resolution=32",
                             "data.bucket_step=8", f"data.cache_dir={cache}", "training.steps=2",
                             "training.batch_size=4", f"output.dir={tmp_path / 'out'}", "output.progress=false",
                             "output.sample_every=0", "output.sample_steps=2", "output.sample_prompts=[red circle]",
                             "output.sample_seeds=[0]"])
    trainer = Trainer(cfg)
    assert trainer.vae is not None
    assert len(list(cache.rglob("*.safetensors"))) == len(trainer.items)
    result = trainer.run()
    assert os.path.exists(result["table"]) and result["samples"]
    latent = trainer.cache.get(trainer.items[0])
    assert latent.shape == (4, 16, 16)


def test_freeze_existing_trains_only_new_tags(demo_dir, tmp_path, capsys):
    """Continuing a table with freeze_existing changes no existing prompt: its tags and special rows stay."""
    first = Trainer(_cfg(demo_dir, tmp_path / "first", "training.steps=1")).run()
    start = TagTable.load(first["table"])
    start.remove_tags(["red circle", "blue square"])
    start.save(tmp_path / "start.safetensors")
    trainer = Trainer(_cfg(demo_dir, tmp_path / "second", f"table.start_from={tmp_path / 'start.safetensors'}",
                           "table.freeze_existing=true", "data.caption_dropout=0"))
    assert "special rows (sink, padding) stay frozen (freeze_existing)" in capsys.readouterr().out
    before, special = trainer.table.data.clone(), trainer.table.special.clone()
    for _ in range(4):
        trainer.train_step()
    old = trainer.existing_rows
    assert old == len(start) and sorted(trainer.table.tags[old:]) == ["blue square", "red circle"]
    assert torch.equal(trainer.table.data[:old], before[:old]), "existing tags stay exactly as they were"
    assert torch.equal(trainer.table.special, special), "the sink and padding (the null prompt) stay too"
    assert not torch.equal(trainer.table.data[old:], before[old:])
