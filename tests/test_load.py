"""unet_patch.load: SD1.x / SD2.x / SDXL models load offline with the right family; everything else is one line."""

import json
import os
import shutil
import socket

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from tests.standins import make_sd2, make_sd15, make_sdxl, make_single_file
from unet_patch.load import (
    DownloadRequiredError,
    MissingConfigError,
    ModelLoadError,
    PickleCheckpointError,
    UnsupportedModelError,
    describe,
    detect_family,
    load_model,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    return {"sd1": make_sd15(tmp), "sd2-v": make_sd2(tmp), "sd2": make_sd2(tmp, prediction_type="epsilon"),
            "sdxl": make_sdxl(tmp)}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test instead of reaching the hub."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sd2", "sdxl"])
def test_each_family_folder_loads_with_its_family(folders, family):
    model = load_model(folders[family])
    assert model.family == family
    assert model.path == folders[family] and model.name == os.path.basename(folders[family])
    stock = UNet2DConditionModel.from_pretrained(os.path.join(folders[family], "unet"))
    assert _same_weights(model.unet, stock)
    assert model.vae is not None
    expected_encoders = ["CLIPTextModel", "CLIPTextModelWithProjection"] if family == "sdxl" else ["CLIPTextModel"]
    assert [type(e).__name__ for e in model.text_encoders] == expected_encoders
    assert len(model.tokenizers) == len(expected_encoders)
    assert model.force_zeros_for_empty_prompt == (family == "sdxl")
    assert model.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    line = describe(model)
    assert "\n" not in line and f"({family}," in line
    assert f"{70 if family == 'sdxl' else 16} cross-attention layers" in line


def test_without_text_encoders_and_free(folders):
    model = load_model(folders["sdxl"], with_text_encoders=False)
    assert model.text_encoders == [] and model.tokenizers == [] and model.family == "sdxl"
    model = load_model(folders["sd1"])
    model.free_text_encoders()
    assert model.text_encoders == [] and model.tokenizers == []


def test_missing_scheduler_falls_back_to_sd_schedule_with_a_warning(folders, tmp_path):
    folder = shutil.copytree(folders["sd1"], tmp_path / "no-scheduler")
    shutil.rmtree(folder / "scheduler")
    with pytest.warns(UserWarning, match="default schedule"):
        model = load_model(str(folder))
    assert type(model.scheduler).__name__ == "DDIMScheduler"
    assert model.scheduler.config.beta_schedule == "scaled_linear" and model.scheduler.config.beta_end == 0.012


def test_half_precision(folders):
    model = load_model(folders["sd1"], torch_dtype=torch.float16)
    assert model.unet.dtype == torch.float16 and model.text_encoders[0].dtype == torch.float16


def test_single_file_ldm_unet_with_local_config(folders, tmp_path, no_network):
    checkpoint, config = make_single_file(tmp_path, folders["sd1"])
    assert all(k.startswith("model.diffusion_model.") for k in load_file(checkpoint))
    model = load_model(checkpoint, config=config)
    assert model.family == "sd1" and model.name == os.path.basename(checkpoint)
    assert _same_weights(model.unet, UNet2DConditionModel.from_pretrained(os.path.join(config, "unet")))
    # UNet-only checkpoint: the VAE and the text encoder come from the config folder.
    assert model.vae is not None and len(model.text_encoders) == 1
    # A UNet-only config folder (just unet/config.json's folder) works too, without text encoders.
    with pytest.warns(UserWarning, match="default schedule"):
        unet_only = load_model(checkpoint, config=os.path.join(config, "unet"))
    assert _same_weights(unet_only.unet, model.unet) and unet_only.text_encoders == [] and unet_only.vae is None


def test_single_file_text_encoder_comes_from_the_checkpoint(folders, tmp_path, no_network):
    # Checkpoint from one model, config folder from another (same architecture, other weights).
    checkpoint, _ = make_single_file(tmp_path, folders["sd1"], with_text_encoder=True)
    other = make_sd15(tmp_path / "other", seed=1)
    model = load_model(checkpoint, config=other)
    assert _same_weights(model.unet, UNet2DConditionModel.from_pretrained(os.path.join(folders["sd1"], "unet")))
    source = CLIPTextModel.from_pretrained(os.path.join(folders["sd1"], "text_encoder"))
    assert _same_weights(model.text_encoders[0], source)
    other_encoder = CLIPTextModel.from_pretrained(os.path.join(other, "text_encoder"))
    assert not _same_weights(model.text_encoders[0], other_encoder)


def test_single_file_with_diffusers_keys(folders, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folders["sd2-v"], "unet"))
    path = str(tmp_path / "unet.safetensors")
    save_file(unet.state_dict(), path)
    model = load_model(path, config=folders["sd2-v"])
    assert model.family == "sd2-v" and _same_weights(model.unet, unet)


def test_single_file_that_does_not_match_its_config_is_one_line(folders, tmp_path):
    checkpoint, _ = make_single_file(tmp_path, folders["sd1"])
    with pytest.raises(ModelLoadError) as err:
        load_model(checkpoint, config=folders["sdxl"])
    assert checkpoint in _one_line(err)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not read")
    with pytest.raises(PickleCheckpointError) as err:
        load_model(str(path), config=str(tmp_path))
    message = _one_line(err)
    assert "pickle" in message and ".safetensors" in message and "convert" in message


def test_hub_ids_are_refused_without_network(folders, tmp_path, no_network):
    with pytest.raises(DownloadRequiredError) as err:
        load_model("stabilityai/stable-diffusion-xl-base-1.0")
    assert "never downloads" in _one_line(err)
    checkpoint, _ = make_single_file(tmp_path, folders["sd1"])
    with pytest.raises(DownloadRequiredError) as err:
        load_model(checkpoint)  # from_single_file without config would fetch one from the hub
    assert "config=" in _one_line(err)
    with pytest.raises(DownloadRequiredError) as err:
        load_model(checkpoint, config="runwayml/stable-diffusion-v1-5")
    assert "runwayml/stable-diffusion-v1-5" in _one_line(err)


def test_missing_unet_config_is_one_line(folders, tmp_path):
    folder = shutil.copytree(folders["sd1"], tmp_path / "broken")
    os.remove(folder / "unet" / "config.json")
    with pytest.raises(MissingConfigError) as err:
        load_model(str(folder))
    assert "unet/config.json" in _one_line(err)
    checkpoint, _ = make_single_file(tmp_path, folders["sd1"])
    with pytest.raises(MissingConfigError) as err:
        load_model(checkpoint, config=str(tmp_path / "broken" / "vae" / ".."))
    _one_line(err)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "nowhere"))
    assert "does not exist" in _one_line(err)


def test_text_encoder_without_tokenizer_is_one_line(folders, tmp_path):
    folder = shutil.copytree(folders["sdxl"], tmp_path / "no-tokenizer-2")
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(MissingConfigError) as err:
        load_model(str(folder))
    assert "tokenizer_2" in _one_line(err)


def _with_unet_config(folders, tmp_path, **changes):
    folder = shutil.copytree(folders["sd1"], tmp_path / "changed")
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("changes, named", [
    (dict(in_channels=9), "inpainting"),
    (dict(in_channels=8), "InstructPix2Pix"),
    (dict(class_embed_type="timestep"), "class embedding"),
    (dict(down_block_types=["DownBlock2D"] * 4, up_block_types=["UpBlock2D"] * 4, mid_block_type="UNetMidBlock2D"),
     "no cross-attention"),
    (dict(_class_name="UNet2DModel"), "UNet2DModel"),
])
def test_unsupported_unets_are_named(folders, tmp_path, changes, named):
    with pytest.raises(UnsupportedModelError) as err:
        load_model(_with_unet_config(folders, tmp_path, **changes))
    assert named in _one_line(err)


@pytest.mark.parametrize("class_name, named", [("SD3Transformer2DModel", "Stable Diffusion 3"),
                                               ("FluxTransformer2DModel", "Flux")])
def test_transformer_folders_are_named(tmp_path, class_name, named):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(UnsupportedModelError) as err:
        load_model(str(tmp_path))
    assert named in _one_line(err)


def test_unsupported_single_files_are_named(folders, tmp_path):
    checkpoint, config = make_single_file(tmp_path, folders["sd1"])
    state = load_file(checkpoint)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros(state[key].shape[0], 9, *state[key].shape[2:])
    save_file(state, str(tmp_path / "inpaint.safetensors"))
    with pytest.raises(UnsupportedModelError) as err:
        load_model(str(tmp_path / "inpaint.safetensors"), config=config)
    assert "inpainting" in _one_line(err)
    save_file({"model.diffusion_model.joint_blocks.0.x": torch.zeros(1)}, str(tmp_path / "sd3.safetensors"))
    with pytest.raises(UnsupportedModelError) as err:
        load_model(str(tmp_path / "sd3.safetensors"), config=config)
    assert "Stable Diffusion 3" in _one_line(err)


# The real models' UNet configs (the keys the rule reads), and the SDXL refiner's.
SD15 = dict(cross_attention_dim=768, in_channels=4, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
SD21 = dict(SD15, cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=[5, 10, 20, 20])
SDXL = dict(cross_attention_dim=2048, in_channels=4, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
REFINER = dict(SDXL, cross_attention_dim=1280, projection_class_embeddings_input_dim=2560,
               down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"])


def test_detect_family_on_real_configs():
    assert detect_family(SD15) == "sd1"
    assert detect_family(SD21) == "sd2"
    assert detect_family(SD21, {"prediction_type": "epsilon"}) == "sd2"
    assert detect_family(SD21, {"prediction_type": "v_prediction"}) == "sd2-v"
    assert detect_family(SDXL, {"prediction_type": "epsilon"}) == "sdxl"
    with pytest.raises(UnsupportedModelError, match="refiner"):
        detect_family(REFINER)
    with pytest.raises(UnsupportedModelError, match="addition_embed_type='image'"):
        detect_family(dict(SD15, addition_embed_type="image"))
