"""Class prompts for zero-shot scoring: the three kinds the paper compares (one builder, used by
training's val check, the evaluate stage and ``medfilip predict``)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from medfilip.config import ExplainParams
from medfilip.explain import render_label

PROMPT_KINDS = ("explanation", "name", "template", "training")
BASELINE_TEMPLATE = "This is an X-ray image of {category}."
IKI_MODE = "triplet_explanation"


def class_prompts(categories: Sequence[str], kind: str, explanations: Mapping[str, str],
                  explain: ExplainParams) -> list[str]:
    """One prompt per class.

    explanation: the class with its knowledge-dictionary explanation in MedFILIP's IKI form
    (``explain.template``), whatever the model was trained on; training: the label text a
    finding of that class got in training, without severity or location (``explain.mode``'s
    rendering: the class name for ``category`` and ``triplet``; ``report`` mode has no per-class
    text and falls back to the IKI form); name: the class name alone; template: the baselines'
    "This is an X-ray image of {category}."
    """
    return [finding_prompt(c, None, kind, explanations, explain) for c in categories]


def finding_prompt(category: str, severity: str | None, kind: str, explanations: Mapping[str, str],
                   explain: ExplainParams) -> str:
    """The prompt of one (severity, category) in ``kind`` (see :func:`class_prompts`); the name
    and template kinds put a severity in front of the name."""
    name = f"{severity} {category}" if severity else category
    if kind == "name":
        return name
    if kind == "template":
        return BASELINE_TEMPLATE.format(category=name)
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompt kind '{kind}' (use one of {', '.join(PROMPT_KINDS)})")
    mode = IKI_MODE if kind == "explanation" or explain.mode == "report" else explain.mode
    return render_label(category, severity, None, False, dataclasses.replace(explain, mode=mode), explanations)
