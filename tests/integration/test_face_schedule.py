"""When the face branch runs, by numbers, in real sampling runs. start_at/end_at are fractions of the
sampling schedule: the branch must be on exactly at the steps whose place in the schedule (ComfyUI's
own timestep of the step's sigma) lies between them, and off elsewhere, over several steps; each
layer's output is checked against text + λ·face computed here from animator.ckpt and the recorded
q/k/v."""
from __future__ import annotations

import pytest
import torch

from support.attn2_reference import (INDEX_OF_KEY, adapter_tensors, face_branch, recording, rel_err, sample,
                                     text_branch)
from support.graphs import ADAPTER

REL_TOL = 2e-5
STEPS = 4  # the normal schedule puts them at 0, 1/3, 2/3 and 1 of the way: far from every edge below


@pytest.fixture(scope="module")
def bed(identity_bed, model_files):
    return identity_bed.unet, identity_bed.ida, identity_bed.embeds, adapter_tensors(model_files["id_animator"][ADAPTER])


def schedule_fraction(model, sigma: float) -> float:
    """How far through the schedule a step is: 0 at the first timestep (999), 1 at the last (0)."""
    sampling = model.get_model_object("model_sampling")
    return 1.0 - float(sampling.timestep(torch.tensor(sigma))) / (len(sampling.sigmas) - 1)


@pytest.mark.parametrize("start_at, end_at", [(0.0, 0.5), (0.5, 1.0), (0.2, 0.8)])
def test_face_branch_runs_exactly_between_start_and_end(comfy, bed, start_at, end_at):
    unet, ida, embeds, layers = bed
    node = comfy.nodes.NODE_CLASS_MAPPINGS["ApplyFaceAdapter"]
    calls: list[dict] = []
    model = recording(node.execute(unet, ida, embeds, 1.0, start_at, end_at, 0.0, None).args[0], calls)
    sample(comfy, model, frames=1, steps=STEPS)
    fractions = sorted({schedule_fraction(unet, c["sigma"]) for c in calls})
    assert len(fractions) == STEPS and len(calls) == 16 * STEPS
    on_steps = {f for f in fractions if start_at <= f <= end_at}
    assert 0 < len(on_steps) < STEPS  # on at some steps, off at others: inverting or ignoring fails
    for call in calls:
        text = text_branch(call)
        face = face_branch(call, layers[INDEX_OF_KEY[call["key"][:2]]], embeds.face_tokens[:1], embeds.uncond_tokens)
        assert rel_err(text + face, text) > 100 * REL_TOL  # the branch is big enough to see
        on = schedule_fraction(unet, call["sigma"]) in on_steps
        expected = text + face if on else text
        assert rel_err(call["out"], expected) <= REL_TOL, (call["key"], call["sigma"], on)
