"""The trainable adapter (train/model.py): shapes from the model, official keys, train/inference
parity of the attention, gradients, the IP-Adapter-Plus start against diffusers' IP-Adapter."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from id_animator.adapter.checkpoint import (
    ADAPTER_WIDTHS, EXPECTED_SHAPES, RESAMPLER_SHAPES, official_state_dict, random_adapter_weights,
    resampler_shapes)
from id_animator.adapter.errors import CheckpointError, TrainingError
from id_animator.adapter.face_attention import decoupled_attention, project_face_tokens
from id_animator.adapter.layer_map import LAYERS, LORA_TARGETS
from id_animator.train.model import (
    AdapterConfig, FaceAdapter, FaceAttnProcessor, ResamplerConfig, initial_adapter)
from support.layouts import container

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402
from support import tiny_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_RANK = 8
# Width 64 = one head of 64: the head split diffusers' IP-Adapter-Plus loader assumes (rows // 64);
# depth 4: the depth it always builds.
TINY_RESAMPLER = ResamplerConfig(dim=64, depth=4, dim_head=64, heads=1, num_queries=4,
                                 embedding_dim=48, output_dim=32, ff_mult=4)


@pytest.fixture(scope="module")
def tiny_unet():
    """training.md §5: same 16 attn2 module names as SD1.5, 4.8 M parameters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = tiny_models.tiny_unet()
    return unet.requires_grad_(False).eval()


@pytest.fixture
def unet(tiny_unet):
    return copy.deepcopy(tiny_unet)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomise_lora(adapter: FaceAdapter, seed: int) -> None:
    """Non-zero LoRA ups, so the LoRA terms (and the down gradients) are exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in adapter.lora_modules():
            lora.up.weight.copy_(torch.randn(lora.up.weight.shape, generator=generator) * 0.05)


# ---------------------------------------------------------------------------------------------
# Shapes and keys


def test_config_from_unet_reads_each_attn2_by_name(tiny_unet) -> None:
    config = AdapterConfig.from_unet(tiny_unet, rank=TINY_RANK, resampler=TINY_RESAMPLER)
    for layer in LAYERS:
        attn = tiny_unet.get_submodule(layer.diffusers_module)
        assert config.widths[layer.official_index] == attn.to_q.out_features
    # the tiny model: 32 wide in the outer blocks, 64 inside (SD1.5: 320/640/1280)
    assert [config.widths[layer.official_index] for layer in LAYERS] == [
        32, 32, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 32, 32, 32, 64]
    assert config.context_dim == 32 and config.rank == TINY_RANK
    assert not config.is_sd15
    assert AdapterConfig.from_unet(tiny_unet).resampler.output_dim == 32  # follows the context


def test_sd15_config_is_the_official_table() -> None:
    config = AdapterConfig.sd15()
    assert dict(config.widths) == ADAPTER_WIDTHS == {layer.official_index: layer.channels for layer in LAYERS}
    assert config.shapes == EXPECTED_SHAPES
    assert config.is_sd15 and config.rank == 128 and config.resampler == ResamplerConfig()


def test_config_refuses_a_unet_without_sd15_layout(tiny_unet) -> None:
    broken = copy.deepcopy(tiny_unet)
    del broken.mid_block.attentions[0]
    with pytest.raises(TrainingError, match="mid_block.attentions.0"):
        AdapterConfig.from_unet(broken)
    with pytest.raises(TrainingError, match="cross-attention width"):
        AdapterConfig(resampler=ResamplerConfig(output_dim=1024))


def test_state_dict_keys_are_the_official_animator_ckpt_keys() -> None:
    adapter = FaceAdapter(AdapterConfig.sd15())
    state = adapter.state_dict()
    expected = {f"image_proj_model.{k}": s for k, s in RESAMPLER_SHAPES.items()}
    expected.update({f"adapter_modules.{i}.{k}": s for i, layer in
                     ((i, {n.split(".", 2)[2]: s for n, s in EXPECTED_SHAPES.items()
                           if n.startswith(f"face_adapter.{i}.")}) for i in ADAPTER_WIDTHS)
                     for k, s in layer.items()})
    assert {k: tuple(t.shape) for k, t in state.items()} == expected
    assert len(state) == 211 and sum(t.numel() for t in state.values()) == 61_817_856  # §3.2 + §3.3
    assert list(state) == list(official_state_dict(adapter.to_weights(), "state_dict")["state_dict"])
    assert len(adapter.adapter_modules) == 32
    assert all(not list(adapter.adapter_modules[i].parameters()) for i in range(0, 32, 2))


def test_lora_starts_as_zero_update_with_diffusers_init() -> None:
    adapter = initial_adapter(AdapterConfig.sd15(), "scratch", seed=3)
    for lora in adapter.lora_modules():
        assert torch.count_nonzero(lora.up.weight) == 0
        rank = lora.down.weight.shape[0]
        assert abs(lora.down.weight.std().item() - 1 / rank) < 0.05 / rank  # normal(0, 1/rank)
    again = initial_adapter(AdapterConfig.sd15(), "scratch", seed=3)
    other = initial_adapter(AdapterConfig.sd15(), "scratch", seed=4)
    state, same, different = adapter.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert not torch.equal(state["image_proj_model.latents"], different["image_proj_model.latents"])


def test_install_sets_only_the_16_attn2_processors(unet) -> None:
    before = dict(unet.attn_processors)
    parameters = len(list(unet.parameters()))
    adapter = FaceAdapter(AdapterConfig.from_unet(unet, rank=TINY_RANK, resampler=TINY_RESAMPLER))
    adapter.install(unet)
    after = unet.attn_processors
    attn2 = {f"{layer.diffusers_module}.processor": layer.official_index for layer in LAYERS}
    assert len(after) == len(before) == 74
    for name, processor in after.items():
        if name in attn2:
            assert processor.processor is adapter.adapter_modules[attn2[name]]
        else:
            assert processor is before[name]
    # the adapter's tensors did not become UNet parameters (freezing/casting the UNet spares them)
    assert len(list(unet.parameters())) == parameters
    FaceAdapter.uninstall(unet)
    assert all(isinstance(unet.attn_processors[name], AttnProcessor2_0) for name in attn2)


def test_install_refuses_an_adapter_of_other_widths(unet) -> None:
    with pytest.raises(TrainingError, match="AdapterConfig.from_unet"):
        FaceAdapter(AdapterConfig.sd15()).install(unet)


def test_context_is_text_then_face_tokens_per_frame() -> None:
    text = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(6, 5, 4)  # B=2, F=3 rows
    tokens = -torch.arange(2 * 2 * 4, dtype=torch.float32).view(2, 2, 4) - 1
    context = FaceAdapter.encoder_hidden_states(text, tokens, frames=3)
    assert context.shape == (6, 7, 4)
    assert torch.equal(context[:, :5], text)
    for row in range(6):  # batch-major rows, frames inner: row r belongs to clip r // 3
        assert torch.equal(context[row, 5:], tokens[row // 3])
    per_clip = FaceAdapter.encoder_hidden_states(text[::3], tokens, frames=3)
    assert torch.equal(per_clip[:, :5], text[::3].repeat_interleave(3, dim=0))
    with pytest.raises(TrainingError, match="rows"):
        FaceAdapter.encoder_hidden_states(text[:4], tokens, frames=3)


# ---------------------------------------------------------------------------------------------
# Train/inference parity of one attn2 layer


def inference_attn2(attn: Attention, processor: FaceAttnProcessor, hidden: torch.Tensor,
                    text: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """Our inference maths: LoRAs merged (W + up·down), face K/V projected, decoupled_attention."""
    def merged(linear: torch.nn.Linear, target: str) -> torch.Tensor:
        lora = getattr(processor, f"{target}_lora")
        return linear.weight + lora.up.weight @ lora.down.weight

    with torch.no_grad():
        q = F.linear(hidden, merged(attn.to_q, "to_q"))
        k = F.linear(text, merged(attn.to_k, "to_k"))
        v = F.linear(text, merged(attn.to_v, "to_v"))
        face_k, face_v = project_face_tokens(face, processor.to_k_face.weight, processor.to_v_face.weight)
        out = decoupled_attention(q, k, v, face_k, face_v, processor.scale, attn.heads)
        return F.linear(out, merged(attn.to_out[0], "to_out"), attn.to_out[0].bias)


def layer_inputs(width: int, context: int, tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 24, width, generator=generator)
    text = torch.randn(3, 77, context, generator=generator)
    face = torch.randn(3, tokens, context, generator=generator)
    return hidden, text, face


def check_layer_parity(attn: Attention, processor: FaceAttnProcessor, seed: int) -> float:
    width, context = attn.to_q.out_features, attn.to_k.in_features
    hidden, text, face = layer_inputs(width, context, processor.num_tokens, seed)
    hidden.requires_grad_(True)
    trained = processor(attn, hidden, torch.cat((text, face), dim=1))  # the training processor
    assert trained.requires_grad  # it ran with autograd on: the out-of-place path
    expected = inference_attn2(attn, processor, hidden.detach(), text, face)
    return relative_error(trained.detach(), expected)


def test_training_attention_equals_inference_maths_on_every_tiny_layer(unet) -> None:
    adapter = initial_adapter(AdapterConfig.from_unet(unet, rank=TINY_RANK, resampler=TINY_RESAMPLER),
                              "scratch", seed=1)
    randomise_lora(adapter, seed=2)
    adapter.set_scale(0.7)
    errors = [check_layer_parity(unet.get_submodule(layer.diffusers_module),
                                 adapter.adapter_modules[layer.official_index], seed=layer.official_index)
              for layer in LAYERS]
    assert max(errors) <= 1e-5, errors


def test_training_attention_equals_inference_maths_at_sd15_width() -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=1280, cross_attention_dim=768, heads=8, dim_head=160)  # SD1.5 mid block
    processor = FaceAttnProcessor(1280, 768, 128, 16, scale=1.0)
    with torch.no_grad():
        for target in LORA_TARGETS:
            getattr(processor, f"{target}_lora").up.weight.normal_(0, 0.01)
    error = check_layer_parity(attn, processor, seed=9)
    assert error <= 1e-5, error


def test_every_trainable_tensor_of_a_layer_gets_a_finite_gradient(unet) -> None:
    adapter = initial_adapter(AdapterConfig.from_unet(unet, rank=TINY_RANK, resampler=TINY_RESAMPLER),
                              "scratch", seed=1)
    randomise_lora(adapter, seed=3)
    layer = LAYERS[4]
    attn, processor = unet.get_submodule(layer.diffusers_module), adapter.adapter_modules[layer.official_index]
    hidden, text, face = layer_inputs(64, 32, processor.num_tokens, seed=5)
    processor(attn, hidden, torch.cat((text, face), dim=1)).square().mean().backward()
    grads = {name: p.grad for name, p in processor.named_parameters()}
    assert len(grads) == 10
    for name, grad in grads.items():
        assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in attn.parameters())  # the frozen layer gets nothing


def test_in_place_sum_would_break_backward() -> None:
    """Why training needs the out-of-place path: autograd refuses the in-place one."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 32, generator=generator, requires_grad=True)
    k, v, fk, fv = (torch.randn(2, n, 32, generator=generator) for n in (77, 77, 16, 16))
    decoupled_attention(q, k, v, fk, fv, 1.0, 4).sum().backward()  # default under grad: fine
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())
    forced = decoupled_attention(q, k, v, fk, fv, 1.0, 4, inplace=True)
    with pytest.raises(RuntimeError, match="inplace"):
        forced.sum().backward()
    with torch.no_grad():  # inference: the text branch is consumed in place, as before
        text_out = torch.randn(2, 6, 32, generator=generator)
        assert decoupled_attention(q, k, v, fk, fv, 1.0, 4, text_out=text_out) is text_out


def test_whole_unet_step_reaches_every_trainable_tensor_and_no_frozen_one(unet) -> None:
    frozen = {k: v.clone() for k, v in unet.state_dict().items()}
    adapter = initial_adapter(AdapterConfig.from_unet(unet, rank=TINY_RANK, resampler=TINY_RESAMPLER),
                              "scratch", seed=0, unet=unet)
    adapter.install(unet)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 2, 8, 8, generator=generator)
    text, clip = torch.randn(2, 77, 32, generator=generator), torch.randn(1, 257, 48, generator=generator)
    for step in range(2):
        optimizer.zero_grad()
        adapter(unet, sample, torch.tensor([500]), text, clip).square().mean().backward()
        grads = [p.grad for p in adapter.trainable_parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        if step == 1:  # at step 0 the LoRA downs get exactly zero (their ups start at zero)
            assert all(g.abs().sum() > 0 for g in grads)
        optimizer.step()
    assert len(adapter.trainable_parameters()) == len(adapter.state_dict()) == 51 + 160
    assert all(torch.equal(v, frozen[k]) for k, v in unet.state_dict().items())


def test_frozen_lora_stays_zero_and_is_still_exported(unet) -> None:
    adapter = initial_adapter(AdapterConfig.from_unet(unet, rank=TINY_RANK, resampler=TINY_RESAMPLER),
                              "scratch", seed=0, unet=unet, train_lora=False)
    adapter.install(unet)
    trainable = {id(p) for p in adapter.trainable_parameters()}
    lora = [p for module in adapter.lora_modules() for p in module.parameters()]
    assert len(lora) == 128 and not trainable & {id(p) for p in lora}
    assert len(trainable) == len(list(adapter.image_proj_model.parameters())) + 32
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    out = adapter(unet, torch.randn(1, 4, 2, 8, 8, generator=generator), torch.tensor([10]),
                  torch.randn(2, 77, 32, generator=generator), torch.randn(1, 257, 48, generator=generator))
    out.square().mean().backward()
    optimizer.step()
    weights = adapter.to_weights()
    for index, layer in weights.layers.items():
        assert len(layer) == 10
        for target in LORA_TARGETS:
            assert torch.count_nonzero(layer[f"{target}_lora.up.weight"]) == 0


# ---------------------------------------------------------------------------------------------
# Weights in and out


def test_to_weights_from_weights_round_trip_is_exact() -> None:
    adapter = initial_adapter(AdapterConfig.sd15(), "scratch", seed=5)
    randomise_lora(adapter, seed=6)
    weights = adapter.to_weights()
    assert weights.tensor_count == 211
    back = FaceAdapter.from_weights(weights, AdapterConfig.sd15())
    a, b = adapter.state_dict(), back.state_dict()
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():  # a copy: training on does not change what was taken out
        adapter.image_proj_model.latents.add_(1.0)
    assert torch.equal(weights.resampler["latents"], b["image_proj_model.latents"])
    assert FaceAdapter.from_weights(weights).config.shapes == AdapterConfig.sd15().shapes


def test_from_weights_refuses_wrong_shapes(tiny_unet) -> None:
    tiny = AdapterConfig.from_unet(tiny_unet, rank=TINY_RANK, resampler=TINY_RESAMPLER)
    with pytest.raises(CheckpointError, match="wrong shape"):
        FaceAdapter.from_weights(random_adapter_weights(0), tiny)


def test_init_from_an_animator_ckpt_loads_it(tmp_path) -> None:
    weights = random_adapter_weights(seed=7)
    path = tmp_path / "animator.ckpt"
    torch.save(container(weights, "state_dict_module"), path)
    adapter = initial_adapter(AdapterConfig.sd15(), path, seed=0, train_lora=False)
    got = adapter.to_weights()
    assert all(torch.equal(got.resampler[k], t) for k, t in weights.resampler.items())
    assert all(torch.equal(got.layers[i][k], t) for i, layer in weights.layers.items() for k, t in layer.items())
    assert not any(p.requires_grad for module in adapter.lora_modules() for p in module.parameters())


def test_init_refuses_missing_and_foreign_files(tmp_path, tiny_unet) -> None:
    with pytest.raises(TrainingError, match="no such file"):
        initial_adapter(AdapterConfig.sd15(), tmp_path / "nothing.ckpt", seed=0)
    path = tmp_path / "animator.ckpt"
    torch.save(official_state_dict(random_adapter_weights(1), "state_dict"), path)
    tiny = AdapterConfig.from_unet(tiny_unet, rank=TINY_RANK, resampler=TINY_RESAMPLER)
    with pytest.raises(CheckpointError, match="wrong shape"):  # an SD1.5 file for the tiny model
        initial_adapter(tiny, path, seed=0)


# ---------------------------------------------------------------------------------------------
# IP-Adapter-Plus as the starting point


def ip_adapter_plus_state(config: AdapterConfig, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """A random file in the IP-Adapter-Plus SD1.5 layout: image_proj.* (our Resampler's names) and
    ip_adapter.<i>.to_k_ip/to_v_ip.weight at the odd indices 1..31."""
    generator = torch.Generator().manual_seed(seed)
    image_proj = {}
    for key, shape in resampler_shapes(config.resampler).items():
        tensor = torch.randn(shape, generator=generator) * 0.05
        if key.endswith(("norm1.weight", "norm2.weight", "norm_out.weight", ".1.0.weight")):
            tensor += 1.0
        image_proj[key] = tensor
    ip_adapter = {}
    for index, width in config.widths.items():
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{index}.{name}.weight"] = (
                torch.randn(width, config.context_dim, generator=generator) / config.context_dim ** 0.5)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.mark.parametrize("layout", ["bin", "safetensors"])
def test_ip_adapter_plus_sd15_maps_every_tensor(tmp_path, layout) -> None:
    from safetensors.torch import save_file

    config = AdapterConfig.sd15()
    state = ip_adapter_plus_state(config, seed=11)
    assert len(state["image_proj"]) == 51 and len(state["ip_adapter"]) == 32
    path = tmp_path / f"ip-adapter-plus-face_sd15.{layout}"
    if layout == "bin":
        torch.save(state, path)
    else:
        save_file({f"{group}.{k}": t for group, part in state.items() for k, t in part.items()}, path)
    adapter = initial_adapter(config, path, seed=0)
    weights = adapter.to_weights()
    assert all(torch.equal(weights.resampler[k], t) for k, t in state["image_proj"].items())
    for index in ADAPTER_WIDTHS:
        layer = weights.layers[index]
        assert torch.equal(layer["to_k_face.weight"], state["ip_adapter"][f"{index}.to_k_ip.weight"])
        assert torch.equal(layer["to_v_face.weight"], state["ip_adapter"][f"{index}.to_v_ip.weight"])
        for target in LORA_TARGETS:
            assert torch.count_nonzero(layer[f"{target}_lora.up.weight"]) == 0
            assert torch.count_nonzero(layer[f"{target}_lora.down.weight"]) > 0


def test_ip_adapter_files_of_other_kinds_are_refused(tmp_path) -> None:
    config = AdapterConfig.sd15()
    state = ip_adapter_plus_state(config, seed=12)
    faceid = {"image_proj": state["image_proj"],
              "ip_adapter": {**state["ip_adapter"], "1.to_q_lora.down.weight": torch.zeros(128, 320)}}
    torch.save(faceid, tmp_path / "faceid.bin")
    with pytest.raises(TrainingError, match="FaceID"):
        initial_adapter(config, tmp_path / "faceid.bin", seed=0)
    sdxl = {"image_proj": {**state["image_proj"], "proj_out.weight": torch.zeros(2048, 768)},
            "ip_adapter": state["ip_adapter"]}
    torch.save(sdxl, tmp_path / "sdxl.bin")
    with pytest.raises(TrainingError, match=r"proj_out.weight: \(2048, 768\), expected \(768, 768\)"):
        initial_adapter(config, tmp_path / "sdxl.bin", seed=0)


def test_step_zero_from_ip_adapter_plus_equals_diffusers_ip_adapter(tmp_path, unet) -> None:
    """Independent implementation: diffusers loads the same file itself (its own key conversion,
    IPAdapterPlusImageProjection, IPAdapterAttnProcessor2_0 at scale 1.0) into a copy of the UNet."""
    config = AdapterConfig.from_unet(unet, rank=TINY_RANK, resampler=TINY_RESAMPLER)
    state = ip_adapter_plus_state(config, seed=13)
    path = tmp_path / "ip-adapter-plus_tiny.bin"
    torch.save(state, path)
    reference = copy.deepcopy(unet)
    reference._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    adapter = initial_adapter(config, path, seed=0)
    adapter.install(unet)

    generator = torch.Generator().manual_seed(14)
    batch, frames = 2, 3
    sample = torch.randn(batch, 4, frames, 8, 8, generator=generator)
    timestep = torch.tensor([321])
    text = torch.randn(batch * frames, 77, 32, generator=generator)
    clip = torch.randn(batch, 257, 48, generator=generator)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_tokens = reference.encoder_hid_proj([clip[:, None]])[0][:, 0]
        expected = reference(sample, timestep, encoder_hidden_states=text,
                             added_cond_kwargs={"image_embeds": [clip[:, None]]}).sample
        tokens = adapter.face_tokens(clip)
        ours = adapter(unet, sample, timestep, text, clip)
    assert tokens.shape == expected_tokens.shape == (batch, 4, 32)
    token_error, output_error = relative_error(tokens, expected_tokens), relative_error(ours, expected)
    assert token_error <= 1e-5 and output_error <= 1e-5, (token_error, output_error)
    # the face branch matters here: without it the outputs differ far beyond the tolerance
    FaceAdapter.uninstall(unet)
    with torch.no_grad():
        plain = unet(sample, timestep, encoder_hidden_states=text).sample
    assert relative_error(plain, expected) > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients(unet) -> None:
    """diffusers checkpoints non-reentrantly, so the adapter (not an input of the checkpointed
    blocks) still gets its gradients, equal to those without checkpointing."""
    adapter = initial_adapter(AdapterConfig.from_unet(unet, rank=TINY_RANK, resampler=TINY_RESAMPLER),
                              "scratch", seed=0, unet=unet)
    randomise_lora(adapter, seed=4)
    adapter.install(unet)
    generator = torch.Generator().manual_seed(3)
    inputs = (torch.randn(1, 4, 2, 8, 8, generator=generator), torch.tensor([700]),
              torch.randn(2, 77, 32, generator=generator), torch.randn(1, 257, 48, generator=generator))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        adapter.zero_grad()
        adapter(unet, *inputs).square().mean().backward()
        grads.append([p.grad.clone() for p in adapter.trainable_parameters()])
    assert unet.is_gradient_checkpointing
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) and a.abs().sum() > 0 for a, b in zip(*grads))
