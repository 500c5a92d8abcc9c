"""condvec-bootstrap: a table from a model folder, and embeddings imported as tags (through the CLI)."""

import pytest
import torch
from safetensors.torch import save_file
from standins import make_sd15

from bootstrap.cli import main
from bootstrap.embeddings import XTI_LAYERS, encode_input_embedding
from bootstrap.text import null_sequence, tag_vectors
from conditioner import TagTable, encode
from unet_patch.load import load_model


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return make_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def model(sd15):
    return load_model(sd15)


def test_bootstrap_from_tags_file_and_data_captions(tmp_path, sd15, model, capsys):
    tags = tmp_path / "tags.txt"
    tags.write_text("red\n# a comment\nblue hair  # trailing comment\n\n")
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(data / "a.png")
    (data / "a.txt").write_text("elephant, red")
    out = tmp_path / "t.safetensors"
    assert main([sd15, "-o", str(out), "--tags", str(tags), "--data", str(data), "--groups", "layers"]) == 0
    table = TagTable.load(out)
    assert table.tags == ["red", "blue hair", "elephant"]
    assert len(table.group_names) == 16 and table.special.shape[0] == 77
    enc = tag_vectors(model, table.tags, progress=False)
    for g in range(len(table.group_names)):  # every group starts from the same vectors
        assert torch.equal(table.data[:, 0, table.group_columns(g)], enc.vectors[:, 0])
    assert "wrote" in capsys.readouterr().out
    # nothing is overwritten without --force
    assert main([sd15, "-o", str(out), "--tags", str(tags)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bootstrap_kv_and_multi_vector_tags(tmp_path, sd15, model):
    tags = tmp_path / "tags.txt"
    tags.write_text("blue hair\ncat\n")
    out = tmp_path / "kv.safetensors"
    assert main([sd15, "-o", str(out), "--tags", str(tags), "--mode", "kv", "--tokens-per-tag", "2"]) == 0
    table = TagTable.load(out)
    assert table.mode == "kv" and table.vectors == {"blue hair": 2, "cat": 2}
    assert encode(table, ["blue hair"]).shape[1] == 77


def test_bootstrap_errors_are_one_line(tmp_path, sd15, capsys):
    assert main([sd15, "-o", str(tmp_path / "t.safetensors")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    tags = tmp_path / "tags.txt"
    tags.write_text("red\n")
    assert main([str(ckpt), "-o", str(tmp_path / "t.safetensors"), "--tags", str(tags)]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "t.safetensors").exists()


def test_import_ti_output_space_and_xti(tmp_path, sd15, model, capsys):
    tags = tmp_path / "tags.txt"
    tags.write_text("red\n")
    table_path = tmp_path / "t.safetensors"
    assert main([sd15, "-o", str(table_path), "--tags", str(tags), "--groups", "layers"]) == 0
    width_in = model.text_encoders[0].get_input_embeddings().weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    ti = torch.randn(2, width_in, generator=gen)
    save_file({"emb_params": ti}, str(tmp_path / "kohya.safetensors"))
    out_vecs = torch.randn(3, model.unet.config.cross_attention_dim, generator=gen)
    save_file({"emp_params": torch.randn(3, width_in, generator=gen), "emp_params_out": out_vecs},
              str(tmp_path / "onetrainer.safetensors"))
    xti = {key: torch.randn(1, width_in, generator=gen) for key in XTI_LAYERS}
    save_file(xti, str(tmp_path / "xti.safetensors"))
    out = tmp_path / "out.safetensors"
    assert main(["import", str(table_path), str(tmp_path / "kohya.safetensors"), str(tmp_path /
                 "onetrainer.safetensors"), str(tmp_path / "xti.safetensors"), "--name", "style", "--name", "hero",
                 "--name", "per layer", "--model", sd15, "-o", str(out)]) == 0
    table = TagTable.load(out)
    assert table.vectors == {"style": 2, "hero": 3}
    expected = encode_input_embedding(model.text_encoders[0], model.tokenizers[0], ti)
    assert torch.equal(table.data[table.expand("style"), 0, :table.dim], expected)
    assert torch.equal(table.data[table.expand("hero"), 0, table.group_columns(5)], out_vecs)
    for li, layer in enumerate(table.layers):  # XTI: each layer its own block's vectors
        key = "MID" if layer.kohya == "M00" else layer.kohya
        want = encode_input_embedding(model.text_encoders[0], model.tokenizers[0], xti[key])
        assert torch.equal(table.data[table.row("per layer"), 0, table.group_columns(li)], want[0])
    assert torch.equal(encode(table, [""])[0], null_sequence(model).sequence.repeat(1, 16))
    # input-space embeddings without a model: one line, nothing written
    assert main(["import", str(table_path), str(tmp_path / "kohya.safetensors"), "-o",
                 str(tmp_path / "no.safetensors")]) == 2
    assert "--model" in capsys.readouterr().err and not (tmp_path / "no.safetensors").exists()


def test_data_captions_are_read_without_opening_images(tmp_path):
    """``--data`` needs only captions: conditioner.captions reads them, no image is decoded (here: none is valid)."""
    from conditioner.captions import scan_captions

    (tmp_path / "a.png").write_bytes(b"not an image at all")
    (tmp_path / "a.txt").write_text("red circle, (large circle:1.2)\n")
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "b.txt").write_text("blue square\n")
    (tmp_path / "c.png").write_bytes(b"")
    assert scan_captions(tmp_path) == ["red circle, (large circle:1.2)", "blue square"]
