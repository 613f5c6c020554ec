"""Class prompts for zero-shot scoring: the three kinds the paper compares (one builder, used by
training's val check, the evaluate stage and ``medfilip predict``)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from medfilip.config import ExplainParams
from medfilip.explain import render_label

PROMPT_KINDS = ("explanation", "name", "template")
BASELINE_TEMPLATE = "This is an X-ray image of {category}."


def class_prompts(categories: Sequence[str], kind: str, explanations: Mapping[str, str],
                  explain: ExplainParams) -> list[str]:
    """One prompt per class.

    explanation: the label text a finding of that class gets in training, without severity
    or location (``explain.mode``'s rendering; ``report`` mode falls back to MedFILIP's
    template); name: the class name alone; template: the baselines' "This is an X-ray image
    of {category}."
    """
    if kind == "name":
        return list(categories)
    if kind == "template":
        return [BASELINE_TEMPLATE.format(category=c) for c in categories]
    if kind != "explanation":
        raise ValueError(f"unknown prompt kind '{kind}' (use one of {', '.join(PROMPT_KINDS)})")
    params = explain if explain.mode != "report" else dataclasses.replace(explain, mode="triplet_explanation")
    return [render_label(c, None, None, False, params, explanations) for c in categories]
