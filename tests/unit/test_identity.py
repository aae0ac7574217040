"""Identity maths: photo averaging, blends, per-frame morph schedules (the FACE_EMBEDS payload)."""
from __future__ import annotations

import pytest
import torch

from id_animator.adapter.checkpoint import (
    AdapterWeights, load_adapter_checkpoint, random_adapter_weights,
    save_adapter_safetensors)
from id_animator.adapter.errors import IDAnimatorError
from id_animator.adapter.identity import (
    AdapterSource, Blend, FaceEmbeds, Identity, adapter_fingerprint, average_photos, blend,
    require_adapter, single_identity)
from support.layouts import container
from support.mixing import mixed_tokens

WIDTH = 768


def person(seed: int, photos: int = 1) -> FaceEmbeds:
    generator = torch.Generator().manual_seed(seed)
    uncond = torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(999))
    return single_identity(torch.randn(photos, 16, WIDTH, generator=generator), uncond)


def test_average_photos_is_the_equal_mean() -> None:
    tokens = torch.randn(3, 16, WIDTH, generator=torch.Generator().manual_seed(0))
    mean = average_photos(tokens)
    assert mean.shape == (16, WIDTH)
    assert torch.allclose(mean, (tokens[0] + tokens[1] + tokens[2]) / 3, rtol=0, atol=1e-6)
    with pytest.raises(IDAnimatorError):
        average_photos(torch.zeros(0, 16, WIDTH))


def test_single_identity_holds_the_mean_and_is_static() -> None:
    tokens = torch.randn(4, 16, WIDTH, generator=torch.Generator().manual_seed(1))
    uncond = torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(2))
    embeds = single_identity(tokens, uncond)
    assert embeds.face_tokens.shape == (1, 16, WIDTH)
    assert torch.equal(embeds.face_tokens[0], tokens.mean(dim=0))
    assert embeds.uncond_tokens is uncond
    assert embeds.is_static and embeds.schedule == Identity(0)
    assert torch.equal(mixed_tokens(embeds, range(5), 5), embeds.face_tokens.expand(5, -1, -1))
    one_photo = single_identity(tokens[0], uncond)  # (16, 768) is one photo
    assert torch.equal(one_photo.face_tokens[0], tokens[0])


@pytest.mark.parametrize("frames", [1, 2, 16])
def test_blend_zero_is_exactly_a_and_one_exactly_b(frames: int) -> None:
    a, b = person(10), person(11)
    at_a, at_b = blend(a, b, 0.0), blend(a, b, 1.0)
    assert torch.equal(at_a.frame_weights(range(frames), frames),
                       torch.tensor([[1.0, 0.0]]).expand(frames, -1))
    assert torch.equal(at_b.frame_weights(range(frames), frames),
                       torch.tensor([[0.0, 1.0]]).expand(frames, -1))
    assert torch.equal(mixed_tokens(at_a, range(frames), frames),
                       a.face_tokens.expand(frames, -1, -1))
    assert torch.equal(mixed_tokens(at_b, range(frames), frames),
                       b.face_tokens.expand(frames, -1, -1))
    assert torch.equal(at_b.uncond_tokens, a.uncond_tokens)


def test_static_blend_is_the_weighted_mean() -> None:
    a, b = person(20), person(21)
    mixed = blend(a, b, 0.3)
    assert mixed.is_static and mixed.identities == 2
    tokens = mixed_tokens(mixed, [0, 7], 8)
    expected = 0.7 * a.face_tokens[0] + 0.3 * b.face_tokens[0]
    assert torch.allclose(tokens, expected.expand(2, -1, -1), rtol=0, atol=1e-5)


def test_morph_hits_endpoints_and_is_linear_between() -> None:
    a, b = person(30), person(31)
    morph = blend(a, b, 0.1, 0.7)
    assert not morph.is_static
    frames = 7
    weights = morph.frame_weights(range(frames), frames)
    # lerp is exact at both ends: the first and last frames get exactly `start` and `end`.
    assert weights[0, 1] == torch.tensor(0.1) and weights[-1, 1] == torch.tensor(0.7)
    expected_b = torch.tensor([0.1 + 0.6 * i / (frames - 1) for i in range(frames)])
    assert torch.allclose(weights[:, 1], expected_b, rtol=0, atol=1e-6)
    assert torch.allclose(weights.sum(dim=1), torch.ones(frames), rtol=0, atol=1e-6)
    middle = mixed_tokens(morph, [3], frames)[0]
    assert torch.allclose(middle, 0.6 * a.face_tokens[0] + 0.4 * b.face_tokens[0], atol=1e-5)


def test_full_morph_starts_at_a_and_ends_at_b() -> None:
    a, b = person(40), person(41)
    morph = blend(a, b, 0.0, 1.0)
    tokens = mixed_tokens(morph, [0, 15], 16)
    assert torch.equal(tokens[0], a.face_tokens[0])
    assert torch.equal(tokens[1], b.face_tokens[0])


def test_weights_at_takes_video_positions() -> None:
    morph = blend(person(50), person(51), 0.2, 0.6)
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(morph.weights_at(t)[:, 1], torch.tensor([0.2, 0.3, 0.6]), atol=1e-6)


def test_frame_weights_clamp_and_single_frame_video() -> None:
    morph = blend(person(60), person(61), 0.0, 1.0)
    past_end = morph.frame_weights([3, 4, 9], 4)
    assert torch.equal(past_end, torch.tensor([[0.0, 1.0]] * 3))
    before_start = morph.frame_weights([-2], 4)
    assert torch.equal(before_start, torch.tensor([[1.0, 0.0]]))
    single = morph.frame_weights([0, 1], 1)  # one-frame video: t = 0, the start of the morph
    assert torch.equal(single, torch.tensor([[1.0, 0.0]] * 2))
    with pytest.raises(IDAnimatorError, match="frame"):
        morph.frame_weights([0], 0)


def test_chained_three_way_blend() -> None:
    a, b, c = person(70), person(71), person(72)
    ab = blend(a, b, 0.5)
    abc = blend(ab, c, 0.25, 0.75)
    assert abc.identities == 3
    assert abc.schedule == Blend(Blend(Identity(0), Identity(1), 0.5, 0.5), Identity(2), 0.25, 0.75)
    weights = abc.frame_weights(range(5), 5)
    assert torch.allclose(weights.sum(dim=1), torch.ones(5), rtol=0, atol=1e-6)
    assert torch.allclose(weights[0], torch.tensor([0.375, 0.375, 0.25]), atol=1e-6)
    assert torch.allclose(weights[-1], torch.tensor([0.125, 0.125, 0.75]), atol=1e-6)
    # Blending onto a blend re-indexes the right-hand identities.
    c_ab = blend(c, ab, 1.0)
    assert c_ab.schedule == Blend(Identity(0), Blend(Identity(1), Identity(2), 0.5, 0.5), 1.0, 1.0)
    assert torch.equal(c_ab.face_tokens[0], c.face_tokens[0])
    assert torch.allclose(mixed_tokens(c_ab, [0], 1)[0],
                          0.5 * a.face_tokens[0] + 0.5 * b.face_tokens[0], atol=1e-5)


def test_invalid_inputs_are_rejected() -> None:
    a, b = person(90), person(91)
    with pytest.raises(IDAnimatorError, match=r"\[0, 1\]"):
        blend(a, b, 1.5)
    with pytest.raises(IDAnimatorError, match="identities"):
        FaceEmbeds(a.face_tokens, a.uncond_tokens, Identity(1))
    with pytest.raises(IDAnimatorError, match="Unconditional"):
        FaceEmbeds(a.face_tokens, torch.zeros(16, 1024))
    other_width = single_identity(torch.zeros(1, 16, 1024), torch.zeros(16, 1024))
    with pytest.raises(IDAnimatorError, match="same ID-Animator"):
        blend(a, other_width, 0.5)


# --- Which adapter made the embeds -----------------------------------------------------------


@pytest.fixture(scope="module")
def full_weights(one_torch_thread) -> AdapterWeights:
    """Random weights at the official full size (61.8 M parameters), fp32."""
    return random_adapter_weights(seed=7)


def test_fingerprint_is_the_same_across_loads_files_and_dtypes(full_weights, tmp_path) -> None:
    """animator.ckpt (official state_dict container, fp32) and its fp16 flat .safetensors, each
    loaded on its own, are one adapter; so is the same file under another name."""
    ckpt = tmp_path / "animator.ckpt"
    torch.save(container(full_weights, "state_dict_module"), ckpt)
    converted = tmp_path / "animator_fp16.safetensors"
    save_adapter_safetensors(full_weights.to(torch.float16), converted)
    fingerprint = adapter_fingerprint(full_weights)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert adapter_fingerprint(load_adapter_checkpoint(ckpt)) == fingerprint
    assert adapter_fingerprint(load_adapter_checkpoint(ckpt)) == fingerprint  # a second load
    fp16 = load_adapter_checkpoint(converted)
    assert next(fp16.tensors()).dtype == torch.float16
    assert adapter_fingerprint(fp16) == fingerprint
    assert AdapterSource.of(fp16, "animator_fp16.safetensors") == AdapterSource.of(full_weights, "animator.ckpt")


def test_fingerprint_changes_with_any_weight(full_weights) -> None:
    fingerprint = adapter_fingerprint(full_weights)
    assert adapter_fingerprint(random_adapter_weights(seed=8)) != fingerprint
    # one face value projection of the last layer, one element: a fine-tune that moved little
    layers = {i: dict(layer) for i, layer in full_weights.layers.items()}
    nudged = layers[31]["to_v_face.weight"].clone()
    nudged[-1, -1] += 0.01
    layers[31]["to_v_face.weight"] = nudged
    assert adapter_fingerprint(AdapterWeights(full_weights.resampler, layers)) != fingerprint
    # two tensors swapped (same shapes): names are part of the fingerprint
    swapped = {i: dict(layer) for i, layer in full_weights.layers.items()}
    swapped[1]["to_k_face.weight"], swapped[1]["to_v_face.weight"] = (
        swapped[1]["to_v_face.weight"], swapped[1]["to_k_face.weight"])
    assert adapter_fingerprint(AdapterWeights(full_weights.resampler, swapped)) != fingerprint
    # bf16 rounds away 3 more bits than fp16: a different (if close) adapter, as documented
    assert adapter_fingerprint(full_weights.to(torch.bfloat16)) != fingerprint


def tagged(seed: int, source: AdapterSource | None) -> FaceEmbeds:
    embeds = person(seed)
    return FaceEmbeds(embeds.face_tokens, embeds.uncond_tokens, embeds.schedule, source)


A = AdapterSource("a1" * 32, "animator.ckpt")
B = AdapterSource("b2" * 32, "my_finetune.safetensors")


def test_blends_refuse_embeds_of_different_adapters_and_name_both() -> None:
    a, b = tagged(100, A), tagged(101, B)
    for mix in (lambda: blend(a, b, 0.5), lambda: blend(b, a, 0.0, 1.0),
                lambda: blend(blend(a, tagged(102, A), 0.5), b, 1 / 3)):
        with pytest.raises(IDAnimatorError) as error:
            mix()
        message = str(error.value)
        for word in ("animator.ckpt", "a1a1a1a1a1a1", "my_finetune.safetensors", "b2b2b2b2b2b2",
                     "same Load ID-Animator"):
            assert word in message, (word, message)


def test_same_adapter_under_another_name_mixes_and_keeps_its_source() -> None:
    copy = AdapterSource(A.fingerprint, "animator_copy.ckpt")
    assert copy == A and hash(copy) == hash(A)
    mixed = blend(tagged(110, A), tagged(111, copy), 0.25)
    assert mixed.adapter == A and mixed.identities == 2
    three = blend(blend(tagged(112, A), tagged(113, A), 2 / 3), tagged(114, copy), 0.5)
    assert three.adapter == A
    # unknown origin (built in code) anywhere in a mix makes the mix's origin unknown
    assert blend(tagged(115, A), tagged(116, None), 0.5).adapter is None
    assert single_identity(torch.zeros(1, 16, WIDTH), torch.zeros(16, WIDTH), A).adapter is A


def test_require_adapter_names_both_and_says_what_to_do() -> None:
    require_adapter(tagged(120, A), AdapterSource(A.fingerprint, "renamed.ckpt"))  # same weights
    require_adapter(tagged(121, None), B)  # built in code: nothing to check
    with pytest.raises(IDAnimatorError) as error:
        require_adapter(tagged(122, A), B)
    message = str(error.value)
    for word in ("ApplyFaceAdapter", "animator.ckpt", "a1a1a1a1a1a1", "my_finetune.safetensors",
                 "b2b2b2b2b2b2", "same Load ID-Animator"):
        assert word in message, (word, message)
    assert message.index("animator.ckpt") < message.index("my_finetune")  # embeds' adapter first


def test_names_alike_adapters_are_told_apart_by_full_fingerprints() -> None:
    one = AdapterSource("c" * 12 + "0" * 52, "animator.ckpt")
    two = AdapterSource("c" * 12 + "1" * 52, "animator.ckpt")
    with pytest.raises(IDAnimatorError) as error:
        require_adapter(tagged(130, one), two)
    assert one.fingerprint in str(error.value) and two.fingerprint in str(error.value)
