"""Zero-shot prediction with a trained model: ``medfilip predict IMAGE... --model DIR``.

Each image is decoded, windowed and letterboxed exactly as the ``pixels`` stage stores it,
embedded on its own (so its scores never depend on which other images share the call), and
scored against one prompt per class by cosine similarity. Classes are the knowledge
dictionary's seen categories unless ``--classes`` picks some (unseen ones included) or
``--class "name=explanation"`` adds a user's own, rendered like any other class.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from medfilip.config import load_params
from medfilip.errors import UserError
from medfilip.prompts import PROMPT_KINDS, class_prompts

FORMATS = ("table", "json")
DEFAULT_TABLE_TOP = 5


@dataclass(frozen=True)
class ImageResult:
    """One image's outcome: scores by class (highest first), or the sentence saying why none."""

    path: str
    scores: Optional[dict[str, float]] = None
    error: Optional[str] = None


# --------------------------------------------------------------------------- classes


class PredictError(UserError, ValueError):
    """A command line that cannot be scored: names the option and what to type instead."""


def parse_user_class(spec: str) -> tuple[str, str]:
    """``"name=explanation"`` -> (name, explanation); anything else is a sentence saying the form."""
    name, sep, text = spec.partition("=")
    name, text = " ".join(name.split()), " ".join(text.split())
    if not sep or not name or not text:
        raise PredictError(
            f"--class {spec!r}: expected \"name=explanation\", e.g. "
            "--class \"pneumothorax=a visceral pleural line with no lung markings beyond it.\""
        )
    return name, text


def select_classes(explanations: Mapping[str, object], names: Optional[Sequence[str]],
                   user: Sequence[tuple[str, str]] = ()) -> tuple[list[str], dict[str, str]]:
    """The classes to score and the explanation text of each.

    ``explanations``: category -> :class:`medfilip.knowledge.Explanation`. Without ``names`` the
    seen categories are scored; ``names`` may name any category of the dictionary, unseen ones
    too. User classes come last and their explanation replaces the dictionary's for that name.
    """
    texts = {c: e.text for c, e in explanations.items()}
    if names:
        unknown = [n for n in names if n not in texts and n not in dict(user)]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, list(texts), n=5, cutoff=0.6)
            hint = f"close names: {', '.join(close)}" if close else "see data/knowledge/dictionary.yaml"
            raise PredictError(
                f"--classes: '{name}' is not a category of the knowledge dictionary ({hint}); "
                "add your own with --class \"name=explanation\""
            )
        classes = list(dict.fromkeys(names))
    else:
        classes = [c for c, e in explanations.items() if not e.unseen]
    for name, text in user:
        texts[name] = text
        if name not in classes:
            classes.append(name)
    return classes, texts


# --------------------------------------------------------------------------- images


def store_pixels(path: Path, size: int) -> np.ndarray:
    """One image as the pixel store holds it: decoded, windowed to uint8, letterboxed to size×size."""
    from medfilip.pixels import load_image, resize_square, to_uint8

    return resize_square(to_uint8(load_image(path, draft_size=size)), size)


def cosine_scores(model, pixels: np.ndarray, text_vectors, classes: Sequence[str]) -> dict[str, float]:
    """Cosine similarity of one image with each class prompt, highest first."""
    image = model.embed_images([pixels])  # one image per call: its scores never see another image
    sims = (image @ text_vectors.T)[0].tolist()
    ranked = sorted(zip(classes, sims), key=lambda cs: -cs[1])
    return {c: round(float(s), 6) for c, s in ranked}


def predict(model, paths: Sequence[Path], classes: Sequence[str], prompts: Sequence[str],
            store_size: int) -> list[ImageResult]:
    """Score every readable image against the prompts; an unreadable one gets its error, the rest go on."""
    from medfilip.pixels import PixelError

    text_vectors = model.embed_texts(list(prompts), getattr(model, "tokenizer", None))
    results = []
    for path in paths:
        try:
            pixels = store_pixels(Path(path), store_size)
        except (PixelError, ImportError) as exc:  # ImportError: a DICOM without pydicom installed
            results.append(ImageResult(str(path), error=str(exc)))
            continue
        results.append(ImageResult(str(path), scores=cosine_scores(model, pixels, text_vectors, classes)))
    return results


# --------------------------------------------------------------------------- output


def format_json(results: Sequence[ImageResult], model_dir: str, kind: str, top: Optional[int]) -> str:
    """The JSON document: model, prompt kind, per image its scores (all, or the top ``top``) or error."""
    images = []
    for r in results:
        if r.error is not None:
            images.append({"path": r.path, "error": r.error})
        else:
            items = list(r.scores.items())[:top] if top else list(r.scores.items())
            images.append({"path": r.path, "scores": dict(items)})
    return json.dumps({"model": model_dir, "prompt": kind, "images": images}, indent=2) + "\n"


def format_table(results: Sequence[ImageResult], top: int) -> str:
    """Per image its path, then the top ``top`` classes with their scores (or its error)."""
    lines = []
    for r in results:
        lines.append(r.path)
        if r.error is not None:
            lines.append(f"  error: {r.error}")
        else:
            width = max(len(c) for c in r.scores) if r.scores else 0
            for c, s in list(r.scores.items())[:top]:
                lines.append(f"  {c:<{width}}  {s:+.4f}")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``medfilip predict`` options."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or DICOM files")
    parser.add_argument("--model", default="data/models/medfilip", help="a saved model folder")
    parser.add_argument("--classes", nargs="+", metavar="CATEGORY",
                        help="score only these dictionary categories (unseen ones too); default: the seen ones")
    parser.add_argument("--class", dest="user_classes", action="append", default=[], metavar="NAME=EXPLANATION",
                        help="add a class of your own with its explanation (repeatable)")
    parser.add_argument("--prompt", choices=PROMPT_KINDS, default="explanation",
                        help="explanation (as in training), name, or the baselines' template")
    parser.add_argument("--format", choices=FORMATS, default="table")
    parser.add_argument("--top", type=int, default=None,
                        help=f"classes shown per image (table default {DEFAULT_TABLE_TOP}; json default: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--params", default="params.yaml")


def _load_model(path: Path, device: str):
    from medfilip.model import ModelError, load

    try:
        return load(path, device=device)
    except ModelError:
        raise
    except Exception as exc:  # corrupt weights, a shape mismatch: still one sentence naming the folder
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"{path}: cannot load the model ({type(exc).__name__}: {first})") from exc


def run(args: argparse.Namespace) -> int:
    """``medfilip predict``: 0 when every image was scored, 1 when any could not be read."""
    from medfilip.knowledge import knowledge_base
    from medfilip.vocab import load_vocabulary

    if args.top is not None and args.top < 1:
        raise PredictError(f"--top must be >= 1, got {args.top}")
    params = load_params(args.params)
    user = [parse_user_class(spec) for spec in args.user_classes]
    explanations, _ = knowledge_base(params.knowledge, load_vocabulary(params.normalize.vocabulary))
    classes, texts = select_classes(explanations, args.classes, user)
    prompts = class_prompts(classes, args.prompt, texts, params.explain)
    model = _load_model(Path(args.model), args.device)
    # The store size training read (never below the model's input, so nothing is upsampled).
    store_size = max(params.pixels.image_size, model.cfg.image_size)

    results = predict(model, [Path(p) for p in args.images], classes, prompts, store_size)
    for r in results:
        if r.error is not None:
            print(f"medfilip: {r.error}", file=sys.stderr)
    if args.format == "json":
        sys.stdout.write(format_json(results, str(args.model), args.prompt, args.top))
    else:
        sys.stdout.write(format_table(results, args.top or DEFAULT_TABLE_TOP))
    return 1 if any(r.error is not None for r in results) else 0
