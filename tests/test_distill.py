"""Data-free distillation (bootstrap.distill, condvec-bootstrap --distill) on tiny SD1.5 / SD2.x / SDXL stand-ins."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from standins import make_sd2, make_sd15, make_sdxl

from bootstrap.cli import main as bootstrap_main
from bootstrap.distill import DistillConfig, DistillError, distill, random_prompts, work_dir
from bootstrap.table import bootstrap_table
from conditioner import encode
from conditioner.table import TagTable
from unet_patch.load import load_model

FAMILIES = {"sd1": make_sd15, "sd2-v": make_sd2, "sdxl": make_sdxl}
TAGS = ["red", "blue hair", "elephant", "glass", "smile"]
SMALL = dict(batch_size=4, pool=8, sample_steps=2, max_tags=3, lr=2e-2, save_every=5)


def _gap(model, table, prompts, seed=0):
    """Mean squared teacher–student difference of UNet predictions on fixed noise (the distillation's loss)."""
    from bootstrap.distill import _added, _pixels
    from bootstrap.text import _encode
    from conditioner.encode import encode_pooled
    from unet_patch import patched

    g = torch.Generator().manual_seed(seed)
    unet = model.unet
    n = len(prompts)
    x = torch.randn(n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    t = torch.randint(1000, (n,), generator=g)
    embeds, pooled, _ = _encode(model, prompts)
    with torch.no_grad():
        teacher = unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=_added(model, pooled, _pixels(model)))
        with patched(unet, table):
            student_pooled = encode_pooled(table, prompts) if table.pooled is not None else None
            student = unet(x, t, encoder_hidden_states=encode(table, prompts),
                           added_cond_kwargs=_added(model, student_pooled, _pixels(model)))
    return float((teacher.sample - student.sample).pow(2).mean())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, folder, load_model(folder)


def test_distillation_lowers_the_teacher_student_gap(family, tmp_path):
    name, _, model = family
    table = bootstrap_table(model, TAGS, tokens_per_tag=1, context_rows=2, progress=False)
    held_out = ["red, glass", "smile, blue hair, elephant", "elephant"]
    before = _gap(model, table, held_out)
    result = distill(model, table, DistillConfig(steps=40, **SMALL), str(tmp_path / "t.safetensors"), progress=False)
    after = _gap(model, table, held_out)
    assert len(result["losses"]) == 40
    assert after < 0.9 * before, (name, before, after)


def test_rows_no_prompt_touched_stay_bit_identical(family, tmp_path):
    _, _, model = family
    table = bootstrap_table(model, TAGS + ["hat"], tokens_per_tag=1, context_rows=1, progress=False)
    start = table.copy()
    prompts = ["red, glass", "smile"]  # "hat", "elephant" and "blue hair" never appear
    distill(model, table, DistillConfig(steps=6, prompts=prompts, **SMALL), str(tmp_path / "t.safetensors"),
            progress=False)
    for tag in ("hat", "elephant", "blue hair"):
        rows = table.expand(tag)
        assert torch.equal(table.data[rows], start.data[rows]), tag
        if table.pooled is not None:
            assert torch.equal(table.pooled[rows], start.pooled[rows])
    moved = table.expand("red")
    assert not torch.equal(table.data[moved], start.data[moved])
    assert torch.equal(table.special, start.special)  # the null sequence stays exact


def test_distilled_table_saves_loads_and_encodes_order_free(family, tmp_path):
    _, _, model = family
    table = bootstrap_table(model, TAGS, tokens_per_tag=2, context_rows=2, progress=False)
    distill(model, table, DistillConfig(steps=3, **SMALL), str(tmp_path / "t.safetensors"), progress=False)
    table.save(tmp_path / "t.safetensors")
    loaded = TagTable.load(tmp_path / "t.safetensors")
    assert loaded.base_model["bootstrap"]["context_rows"] == 2
    assert torch.equal(loaded.data, table.data)
    a, b = encode(loaded, ["red, elephant, smile"])[0], encode(loaded, ["smile, red, elephant"])[0]
    assert torch.equal(a.sort(0).values, b.sort(0).values)  # the same vectors, in another order


def test_resume_after_a_stop_equals_one_run(tmp_path):
    folder = make_sd15(tmp_path / "m")
    model = load_model(folder)
    config = dict(SMALL, save_every=3)
    one = bootstrap_table(model, TAGS, context_rows=1, progress=False)
    distill(model, one, DistillConfig(steps=9, **config), str(tmp_path / "one.safetensors"), progress=False)
    two = bootstrap_table(model, TAGS, context_rows=1, progress=False)
    distill(model, two, DistillConfig(steps=6, **config), str(tmp_path / "two.safetensors"), progress=False)
    fresh = bootstrap_table(model, TAGS, context_rows=1, progress=False)  # a new process: only the checkpoint
    distill(model, fresh, DistillConfig(steps=9, **config), str(tmp_path / "two.safetensors"), resume=True,
            progress=False)
    assert torch.equal(fresh.data, one.data)


def test_random_prompts_are_sets_of_vocabulary_tags():
    prompts = random_prompts(TAGS, 50, 3, seed=1)
    for p in prompts:
        tags = p.split(", ")
        assert 1 <= len(tags) <= 3 and len(set(tags)) == len(tags) and set(tags) <= set(TAGS)
    assert len({len(p.split(", ")) for p in prompts}) == 3  # every length drawn


@pytest.mark.parametrize("field,value", [("steps", 0), ("steps", -3), ("batch_size", 0), ("lr", 0.0),
                                         ("lr", float("nan"))])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(DistillError, match=field.replace("_", "-") if field != "lr" else "lr"):
        DistillConfig(**{field: value})


def _cli(args, capsys):
    code = bootstrap_main(args)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = make_sd15(tmp_path_factory.mktemp("cli"))
    tags = tmp_path_factory.mktemp("tags") / "tags.txt"
    tags.write_text("\n".join(TAGS) + "\n")
    return folder, str(tags)


@pytest.mark.parametrize("extra,message", [
    (["--distill-steps", "0"], "--distill-steps must be >= 1"),
    (["--distill-steps", "-5"], "--distill-steps must be >= 1"),
    (["--prompts", "PROMPTS"], "outside the vocabulary: 'purple'"),
    (["--mode", "kv"], "vector-mode"),
])
def test_cli_bad_input_one_line_nothing_written(sd15, tmp_path, capsys, extra, message):
    folder, tags = sd15
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red, purple\nglass\n")
    out = tmp_path / "t.safetensors"
    args = [folder, "-o", str(out), "--tags", tags, "--distill"] + [str(prompts) if a == "PROMPTS" else a
                                                                     for a in extra]
    code, err = _cli(args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not os.path.exists(work_dir(str(out)))


def test_cli_refuses_bad_vocabularies_and_models(sd15, tmp_path, capsys):
    folder, _ = sd15
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    out = tmp_path / "t.safetensors"
    for tags, message in ((empty, "no tags to bootstrap"), (latin, "not UTF-8")):
        code, err = _cli([folder, "-o", str(out), "--tags", str(tags), "--distill"], capsys)
        assert code == 2 and message in err, err
    no_encoder = tmp_path / "no-encoder"
    import shutil

    shutil.copytree(folder, no_encoder)
    shutil.rmtree(no_encoder / "text_encoder")
    code, err = _cli([str(no_encoder), "-o", str(out), "--tags", str(sd15[1]), "--distill"], capsys)
    assert code == 2 and "text encoder" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.slow
def test_cli_kill_mid_distillation_then_resume(sd15, tmp_path):
    """SIGKILL during the distillation: no table is written; --resume finishes it; a rerun without it is refused."""
    folder, tags = sd15
    out = tmp_path / "t.safetensors"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "bootstrap.cli", folder, "-o", str(out), "--tags", tags, "--distill",
            "--distill-steps", "400", "--context-rows", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = os.path.join(work_dir(str(out)), "checkpoint", "state.json")
    import time

    deadline = time.time() + 240
    while not os.path.exists(state) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert os.path.exists(state) and not out.exists()
    again = subprocess.run(args, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr and not out.exists()
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    TagTable.load(out)  # complete and valid
    assert os.path.exists(os.path.join(work_dir(str(out)), "loss.png"))


_TWO_PROCESS_SCRIPT = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
from bootstrap.distill import DistillConfig, distill
from bootstrap.table import bootstrap_table
from unet_patch.load import load_model
torch.set_num_threads(1)
model = load_model(sys.argv[1])
table = bootstrap_table(model, {tags!r}, tokens_per_tag=1, context_rows=1, progress=False)
distill(model, table, DistillConfig(steps=4, **{small!r}), sys.argv[2], progress=False)
if dist.get_rank() == 0:
    table.save(sys.argv[2])
dist.destroy_process_group()
"""


def test_two_processes_learn_what_one_does(tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes half of every batch, only the touched rows' gradients are
    all-reduced, and the table ends where one process's run ends (up to float summation order)."""
    folder = make_sd15(tmp_path / "model")
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT.format(tags=TAGS, small=SMALL))
    out = tmp_path / "two.safetensors"
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                        "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    with socket.socket() as free:  # torchrun's workers need a real port (0 is not picked for them)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script), str(folder), str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model = load_model(folder)
    table = bootstrap_table(model, TAGS, tokens_per_tag=1, context_rows=1, progress=False)
    start = table.copy()
    distill(model, table, DistillConfig(steps=4, **SMALL), str(tmp_path / "one.safetensors"), progress=False)
    two = TagTable.load(out)
    assert not torch.equal(table.data, start.data), "the one-process run learnt nothing"
    assert torch.allclose(two.data, table.data, atol=1e-5, rtol=1e-4), (two.data - table.data).abs().max()
