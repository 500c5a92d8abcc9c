"""kohya users' habits: a sd-scripts dataset_config.toml trains as written, keep_tokens / keep_tags are never
dropped, and training.epochs counts passes over the data."""

from pathlib import Path

import pytest

from demo.data import generate_concept_dataset, generate_demo_dataset
from train.config import ConfigError, load_config
from train.kohya import read_kohya_config


def _toml(tmp_path: Path) -> Path:
    generate_concept_dataset(tmp_path / "mascot", "mascot", {"size": "large", "colour": "magenta", "shape": "circle"},
                             6, size=32, seed=1)
    generate_demo_dataset(tmp_path / "scenes", 5, size=32, seed=2)
    reg = tmp_path / "reg"
    generate_demo_dataset(reg, 3, size=32, seed=3)
    for caption in reg.glob("*.txt"):
        caption.unlink()  # a DreamBooth class folder: class_tokens is the caption
    path = tmp_path / "dataset.toml"
    path.write_text('''
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
flip_aug = false

[[datasets]]
resolution = 16
enable_bucket = false
mystery_key = 3

  [[datasets.subsets]]
  image_dir = "mascot"
  num_repeats = 4

  [[datasets.subsets]]
  image_dir = "scenes"
  num_repeats = 2
  keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "reg"
  class_tokens = "red circle"
  is_reg = true
''')
    return path


def test_kohya_config_is_read_as_sd_scripts_documents_it(tmp_path):
    config = read_kohya_config(str(_toml(tmp_path)))
    assert [(Path(s.image_dir).name, s.num_repeats, s.keep_tokens, s.is_reg) for s in config.subsets] == [
        ("mascot", 4, 1, False), ("scenes", 2, 2, False), ("reg", 1, 1, True)]
    assert config.subsets[2].class_tokens == "red circle" and config.subsets[0].caption_extension == ".txt"
    assert config.resolution == 16 and config.enable_bucket is False
    assert any("datasets.mystery_key" in note for note in config.notes)
    assert any("flip_aug" in note for note in config.notes)


def _args(tmp_path, *extra):
    return ["model.builtin=micro", "data.path=null", f"data.kohya_config={tmp_path / 'dataset.toml'}",
            "data.tag_dropout=0.9", "data.caption_dropout=0.0", "training.batch_size=4",
            f"output.dir={tmp_path / 'run'}", "output.sample_every=0", "output.progress=false",
            "output.save_every=1000", *extra]


def test_a_kohya_dataset_trains_with_repeats_epochs_and_keep_tokens(tmp_path, capsys):
    from train.loop import Trainer

    _toml(tmp_path)
    trainer = Trainer(load_config(None, _args(tmp_path, "training.epochs=2")))
    log = capsys.readouterr().out
    assert "regularisation subset" in log and "reg skipped" in log, log  # train=table: prior preservation skipped
    assert sum(item.repeats for item in trainer.items) == 6 * 4 + 5 * 2
    assert trainer.cfg.training.steps == 2 * -(-34 // 4) and "training.epochs=2: 18 steps" in log
    dropped = 0
    for step in range(40):  # tag dropout 0.9: without keep_tokens the first tags would mostly go
        for plan in trainer.planner.plan(step):
            item, caption = trainer.items[plan.index], trainer.captions[plan.index]
            assert plan.tags[:item.keep] == caption[:item.keep], (item.path, plan.tags)
            dropped += len(caption) - len(plan.tags)
    assert dropped > 0
    trainer.run()
    assert (tmp_path / "run" / "table.safetensors").exists()


def test_reg_subset_trains_when_unet_weights_do(tmp_path):
    from train.loop import Trainer

    _toml(tmp_path)
    trainer = Trainer(load_config(None, _args(tmp_path, "training.train=table+kv", "training.steps=1")))
    reg = [item for item in trainer.items if "/reg/" in item.path]
    assert len(reg) == 3 and all(item.caption == "red circle" for item in reg)


def test_keep_tags_by_name_are_never_dropped(tmp_path):
    from train.loop import Trainer

    data = tmp_path / "data"
    generate_concept_dataset(data, "mascot", {"size": "large", "colour": "magenta", "shape": "circle"}, 8, size=32,
                             seed=1)
    cfg = load_config(None, ["model.builtin=micro", f"data.path={data}", "data.resolution=16", "data.bucketing=false",
                             "data.tag_dropout=0.95", "data.caption_dropout=0.0", "data.keep_tags=[Mascot]",
                             "training.batch_size=4", f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    trainer = Trainer(cfg)
    dropped_others = 0
    for step in range(200):
        for plan in trainer.planner.plan(step):
            assert "mascot" in [t.name for t in plan.tags]
            dropped_others += len(trainer.captions[plan.index]) - len(plan.tags)
    assert dropped_others > 0, "tag dropout did drop the other tags"


@pytest.mark.parametrize("override, message", [
    ("data.keep_tags=-1", "'data.keep_tags' must be an integer >= 0 or a list of tag names"),
    ("training.epochs=-1", "'training.epochs' and 'output.save_every_epochs' must be >= 0"),
])
def test_bad_kohya_keys_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, ["model.builtin=micro", "data.path=x", override])


def test_path_and_kohya_config_are_exclusive():
    with pytest.raises(ConfigError, match="exactly one of data.path"):
        load_config(None, ["model.builtin=micro", "data.path=x", "data.kohya_config=y.toml"])
