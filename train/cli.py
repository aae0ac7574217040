"""One entry point, one sub-command per step: pool, caption, captions, latents, train, export, score.

Each step lives in its own module, which provides `configure(parser)` (its arguments) and
`run(args) -> int` (its work); modules are imported only for the command asked, so `--help` and
the light commands never import diffusers. A `TrainingError` or `CheckpointError` is the user's
to fix: it is printed as one message, without a traceback, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..adapter.errors import IDAnimatorError

PROG = "python -m id_animator.train"

COMMANDS: dict[str, tuple[str, str]] = {  # command: (module, one-line help)
    "pool": ("face_pool", "build each video's face pool: up to 5 aligned single-face crops"),
    "caption": ("caption", "caption videos with local VLMs and an LLM: attribute, action, unified"),
    "captions": ("captions", "merge attribute and action captions into unified captions"),
    "latents": ("latents", "cut clips and encode them once with the checkpoint's VAE"),
    "train": ("loop", "random reference training of the adapter (run under accelerate launch)"),
    "export": ("export", "write a training state as animator.ckpt and .safetensors, verified"),
    "score": ("score", "identity scores of generated videos: face similarity and CLIP-I"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (all of them when None, for --help)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        if command == name:
            module = importlib.import_module(f".{module_name}", __package__)
            module.configure(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.run(args)
    except IDAnimatorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
