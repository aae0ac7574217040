"""FaceSimilarity: how much of the reference person survives in each generated frame.

ArcFace cosine between the reference face and the face in each frame, with the detector and the
recognition model that IDA_LoadFaceScorer loaded (docs/scoring.md has the protocol); nothing is
loaded here, so a new video reuses the loader's cached models. Outputs plain
FLOATs; `frame_scores` is a ComfyUI output list (one FLOAT per frame, NaN where the frame has no
face), so a node downstream runs once per frame or takes the whole list.
"""
from __future__ import annotations

import logging
import math

import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..adapter.errors import IDAnimatorError, NoFaceError
from ..adapter.face_recognition import (
    FRAME_FACE_MODES, IdentityScores, detector_function, embed_references, score_frames,
)
from ..adapter.score_plot import Series, plot_scores
from .types import FACE_SCORER, FaceScorer

NODE = "FaceSimilarity"


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def plot_title(scores: IdentityScores) -> str:
    return (f"face similarity: mean {_fmt(scores.mean)} | face in {len(scores.scored)}/{len(scores.frames)} "
            f"frames | stability {_fmt(scores.stability)}")


class FaceSimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceSimilarity",
            display_name="Face Similarity (ID-Animator)",
            category="id_animator",
            description="Scores how well each generated frame keeps the reference person: ArcFace cosine "
                        "between the reference face and the face in every frame, with the share of frames "
                        "that show a face and the frame-to-frame identity stability.",
            search_aliases=["identity score", "face sim", "arcface", "insightface", "face similarity", "metric"],
            is_output_node=True,  # its plot is shown on the node, so it runs with nothing connected after it
            inputs=[
                io.Image.Input("reference", tooltip="Photo(s) of the person (several: their mean embedding). "
                                                    "The most confident face of each photo is used."),
                io.Image.Input("frames", tooltip="The generated frames (a decoded video: an IMAGE batch)."),
                FACE_SCORER.Input("face_scorer", tooltip="From Load Face Scorer: the recognition model (and "
                                                         "detector) the scores are made with."),
                io.Combo.Input("frame_face", options=list(FRAME_FACE_MODES), default="largest",
                               tooltip="Which face of a frame with several is scored: largest (the protocol's "
                                       "default), most confident, or best match (the one closest to the "
                                       "reference: flatters, use it only for multi-person videos)."),
            ],
            outputs=[
                io.Float.Output(display_name="mean_score",
                                tooltip="Mean ArcFace cosine over the frames with a face (-1..1, higher = closer "
                                        "to the reference). NaN if no frame has a face."),
                io.Float.Output(display_name="frame_scores", is_output_list=True,
                                tooltip="One cosine per frame, in frame order, NaN where the frame has no face "
                                        "(an output list: a downstream node runs once per frame)."),
                io.Float.Output(display_name="face_share",
                                tooltip="Share of frames where a face was found (0..1). Frames without a face "
                                        "are left out of mean_score, never scored 0."),
                io.Float.Output(display_name="stability",
                                tooltip="Mean cosine between the faces of consecutive frames that have one "
                                        "(1 = the same face throughout). NaN with fewer than two such frames."),
                io.Image.Output(display_name="plot",
                                tooltip="Score per frame; frames without a face are marked with a red x."),
            ],
        )

    @classmethod
    def execute(cls, reference: torch.Tensor, frames: torch.Tensor, face_scorer: FaceScorer,
                frame_face: str) -> io.NodeOutput:
        if reference.shape[0] == 0:
            raise NoFaceError(f"{NODE}: the reference batch is empty: connect at least one photo of the person.")
        if frames.shape[0] == 0:
            raise IDAnimatorError(f"{NODE}: the frames batch is empty: connect the decoded video (VAE Decode).")
        recognizer = face_scorer.recognizer
        detect = detector_function(face_scorer.detector)
        try:
            reference_embedding = embed_references(reference, detect, recognizer)
            progress = comfy.utils.ProgressBar(frames.shape[0])
            scores = score_frames(enumerate(frames), reference_embedding, detect, recognizer, frame_face,
                                  progress=lambda: progress.update(1))
        except IDAnimatorError as error:
            raise type(error)(f"{NODE}: {error}") from error
        if scores.missing:
            logging.info("%s: no face in frame(s) %s of %d", NODE, scores.missing, len(scores.frames))
        plot = torch.from_numpy(plot_scores([Series("face similarity", scores.per_frame())], plot_title(scores),
                                            no_face=scores.missing)).float().div(255.0)[None]  # (1,H,W,3)
        return io.NodeOutput(scores.mean, scores.per_frame(), scores.face_share, scores.stability, plot,
                             ui=ui.PreviewImage(plot, cls=cls))
