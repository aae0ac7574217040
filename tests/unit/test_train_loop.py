"""The training step on the tiny UNetMotionModel of training.md §5 (the SD1.5 block layout at small
widths: the same 16 attn2 module names), a tiny CLIP text encoder and image encoder built from
configs (image-feature width 48), and an adapter whose shapes are read from those models.

No files: the step function takes pre-built modules and a batch in `data.collate`'s form.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from id_animator.adapter.layer_map import LAYERS
from id_animator.train.loop import (
    FrozenModels, build_adapter, freeze, make_optimizer, training_step,
)
from id_animator.train.sd15 import encode_prompts, noise_scheduler
from support.tiny_models import (
    ADAPTER as TINY_ADAPTER, CONTEXT, QUERIES, tiny_image_encoder, tiny_text_encoder, tiny_unet,
)

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES, SIDE = 2, 8


def tiny_frozen_models(tokenizer_dir: Path) -> FrozenModels:
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    unet, text, vision = tiny_unet(), tiny_text_encoder(), tiny_image_encoder()
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return FrozenModels(unet=freeze(unet), text_encoder=freeze(text), tokenizer=tokenizer,
                        image_encoder=freeze(vision), scheduler=noise_scheduler())


@pytest.fixture(scope="module")
def frozen(comfyui_dir: Path) -> FrozenModels:
    return tiny_frozen_models(comfyui_dir / "comfy" / "sd1_tokenizer")


def frozen_state(frozen: FrozenModels) -> dict[str, torch.Tensor]:
    """Every frozen tensor (UNet + motion, text and image encoders), without adapter processors."""
    state = {}
    for name in ("unet", "text_encoder", "image_encoder"):
        for key, value in getattr(frozen, name).state_dict().items():
            if ".processor." not in key:
                state[f"{name}.{key}"] = value.detach().clone()
    return state


def make_batch(seed: int, batch: int = 2, captions: tuple[str, ...] = ("a woman smiles", "a man talks"),
               drop_image: tuple[bool, ...] | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, FRAMES, 4, SIDE, SIDE, generator=g),
        "noise": torch.randn(batch, FRAMES, 4, SIDE, SIDE, generator=g),
        "timestep": torch.randint(1000, (batch,), generator=g),
        "caption": list(captions[:batch]),
        "reference": torch.randint(0, 256, (batch, 3, 224, 224), generator=g, dtype=torch.uint8),
        "drop_image": torch.tensor(drop_image or (False,) * batch),
    }


def new_model(frozen: FrozenModels, train_lora: bool = True, seed: int = 0) -> torch.nn.Module:
    """A FaceAdapter shaped from the tiny models, installed on the tiny UNet."""
    adapter = build_adapter(frozen.unet, frozen.image_encoder, seed=seed, train_lora=train_lora,
                            overrides=TINY_ADAPTER)
    adapter.install(frozen.unet)
    return adapter


def step(model: torch.nn.Module, frozen: FrozenModels, optimizer, batch: dict) -> float:
    loss = training_step(model, frozen, batch, "cpu")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def lora_parameters(adapter: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in adapter.named_parameters() if "_lora." in name}


def test_adapter_shapes_follow_the_model(frozen: FrozenModels):
    adapter = new_model(frozen)
    modules = dict(frozen.unet.named_modules())
    widths = {layer.diffusers_module: modules[layer.diffusers_module].to_q.out_features for layer in LAYERS}
    assert sorted(set(widths.values())) == [32, 64]
    face_k = {name: p.shape for name, p in adapter.named_parameters() if name.endswith("to_k_face.weight")}
    assert sorted(face_k.values()) == sorted(torch.Size((w, CONTEXT)) for w in widths.values())
    tokens = adapter.face_tokens(torch.randn(2, 257, 48))
    assert tokens.shape == (2, QUERIES, CONTEXT)
    assert all(p.shape[0] == 8 for n, p in lora_parameters(adapter).items() if n.endswith("down.weight"))


def test_overfitting_one_clip_lowers_the_loss(frozen: FrozenModels):
    model = new_model(frozen)
    optimizer = make_optimizer(model, lr=1e-2)
    batch = make_batch(1, batch=1)
    batch["timestep"] = torch.tensor([500])
    started = time.perf_counter()
    losses = [step(model, frozen, optimizer, batch) for _ in range(20)]
    seconds = (time.perf_counter() - started) / len(losses)
    print(f"overfit one clip: loss {losses[0]:.4f} -> {losses[-1]:.4f} in 20 steps, {seconds:.3f} s/step")
    assert losses[-1] < 0.6 * losses[0], f"the loss did not drop by 40% in 20 steps: {losses}"


def test_frozen_models_bit_identical_after_training(frozen: FrozenModels):
    before = frozen_state(frozen)
    model = new_model(frozen)
    optimizer = make_optimizer(model, lr=1e-2)
    adapter_before = {k: v.clone() for k, v in model.state_dict().items()}
    for seed in range(3):
        step(model, frozen, optimizer, make_batch(seed))
    after = frozen_state(frozen)
    assert after.keys() == before.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert not changed, f"frozen weights changed: {changed[:5]}"
    assert any(not torch.equal(adapter_before[k], v) for k, v in model.state_dict().items()), \
        "the adapter did not train, so the check above proves nothing"
    assert not any(p.requires_grad for m in (frozen.unet, frozen.text_encoder, frozen.image_encoder)
                   for n, p in m.named_parameters() if ".processor." not in n)


@pytest.mark.parametrize("train_lora", [True, False])
def test_optimizer_holds_exactly_the_trainable_adapter_tensors(frozen: FrozenModels, train_lora: bool):
    model = new_model(frozen, train_lora=train_lora)
    optimizer = make_optimizer(model)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    lora = lora_parameters(model)
    expected = [p for n, p in model.named_parameters() if train_lora or "_lora." not in n]
    assert len(lora) == 16 * 8
    assert {id(p) for p in held} == {id(p) for p in expected} and len(held) == len(expected)
    if train_lora:
        return
    assert not {id(p) for p in held} & {id(p) for p in lora.values()}
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    for seed in range(2):
        step(model, frozen, optimizer, make_batch(seed))
    assert all(torch.equal(lora_before[n], p) for n, p in lora.items())
    assert all(torch.count_nonzero(p) == 0 for n, p in lora.items() if ".up." in n), "LoRA up is not zero"


def test_every_trainable_tensor_gets_a_gradient_from_the_second_step(frozen: FrozenModels):
    model = new_model(frozen)
    optimizer = make_optimizer(model, lr=1e-3)
    step(model, frozen, optimizer, make_batch(0))
    optimizer.zero_grad(set_to_none=True)
    training_step(model, frozen, make_batch(1), "cpu").backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))
    missing = [n for n, p in trainable if p.grad is None]
    bad = [n for n, p in trainable if p.grad is not None and not (torch.isfinite(p.grad).all() and p.grad.any())]
    assert not missing and not bad, f"no gradient: {missing[:4]}; zero or non-finite: {bad[:4]}"


def test_one_timestep_per_clip_and_one_context_row_per_frame(frozen: FrozenModels):
    model = new_model(frozen)
    seen = {}

    def unet_inputs(module, args, kwargs):
        seen["sample"], seen["timestep"] = args[0].detach(), args[1].detach()
        seen["context"] = kwargs["encoder_hidden_states"].detach()

    def time_proj_input(module, args):
        seen["time_proj"] = args[0].detach()

    hooks = [frozen.unet.register_forward_pre_hook(unet_inputs, with_kwargs=True),
             frozen.unet.time_proj.register_forward_pre_hook(time_proj_input)]
    batch = make_batch(3, captions=("a woman smiles", ""), drop_image=(False, True))
    try:
        with torch.no_grad():
            training_step(model, frozen, batch, "cpu")
    finally:
        for hook in hooks:
            hook.remove()
    t = batch["timestep"]
    assert torch.equal(seen["timestep"], t) and torch.equal(seen["time_proj"], t.float())
    assert seen["sample"].shape == (2, 4, FRAMES, SIDE, SIDE)  # (B, C, F, H, W)
    # z_t = sqrt(ᾱ_t) z_0 + sqrt(1-ᾱ_t) ε with AnimateDiff's linear betas, ᾱ of each clip's own t.
    alphas = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64), 0)
    x0 = batch["latents"].permute(0, 2, 1, 3, 4).double()
    eps = batch["noise"].permute(0, 2, 1, 3, 4).double()
    a = alphas[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(seen["sample"].double(), a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-5, atol=1e-5)
    context = seen["context"]
    assert context.shape == (2 * FRAMES, 77 + QUERIES, CONTEXT)
    for clip in range(2):
        rows = context[clip * FRAMES:(clip + 1) * FRAMES]
        assert all(torch.equal(rows[0], row) for row in rows), "frames of one clip got different contexts"
    assert not torch.equal(context[0], context[FRAMES])
    # A dropped caption is the encoded empty prompt; clip 0 is its caption's encoding.
    empty = frozen.text_encoder(frozen.tokenizer([""], padding="max_length", max_length=77,
                                                 return_tensors="pt").input_ids)[0][0]
    assert torch.equal(context[FRAMES, :77], empty)
    assert torch.equal(context[0, :77], encode_prompts(frozen.text_encoder, frozen.tokenizer, ["a woman smiles"])[0])
    assert not torch.equal(context[0, :77], empty)
    # Face tokens come after the 77 text tokens; a dropped image gives the null face (zero normalised pixels).
    features = frozen.image_encoder(pixel_values=torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
    null_face = model.face_tokens(features)[0]
    torch.testing.assert_close(context[FRAMES, 77:], null_face, rtol=0, atol=1e-6)
    assert not torch.allclose(context[0, 77:], null_face, atol=1e-3)
