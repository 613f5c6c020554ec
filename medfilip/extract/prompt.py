"""Versioned extraction prompts: ``data/prompts/<version>/{system.md, examples.yaml}``.

The version (folder name) and a hash of the files' text are part of the cache key, so
editing a prompt re-asks the model while the answers to the old prompt stay cached.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from medfilip.errors import UserError
from medfilip.extract.schema import validate_answer


class PromptError(UserError, ValueError):
    """A prompt folder that is missing a file or has a malformed example."""


@dataclass(frozen=True)
class Prompt:
    version: str
    system: str
    examples: tuple[tuple[str, str], ...]  # (report, answer JSON text)

    @property
    def fingerprint(self) -> str:
        blob = json.dumps([self.version, self.system, self.examples], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def messages(self, report: str) -> list[dict[str, str]]:
        """Chat messages for one report: instructions, worked examples, then the report.

        The report is fenced as data so that text inside it ("ignore previous
        instructions") reads as report content, not as an instruction.
        """
        msgs = [{"role": "system", "content": self.system}]
        for example_report, answer in self.examples:
            msgs.append({"role": "user", "content": render_report(example_report)})
            msgs.append({"role": "assistant", "content": answer})
        msgs.append({"role": "user", "content": render_report(report)})
        return msgs


def render_report(report: str) -> str:
    return f"<report>\n{report.strip()}\n</report>"


def load_prompt(folder: str | Path) -> Prompt:
    """Read and check a prompt folder; every worked example must itself be a valid answer."""
    folder = Path(folder)
    system_path, examples_path = folder / "system.md", folder / "examples.yaml"
    for path in (system_path, examples_path):
        if not path.exists():
            raise PromptError(f"{path}: prompt file missing (llm.prompt points at {folder})")
    raw = yaml.safe_load(examples_path.read_text()) or []
    examples = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "report" not in item or "answer" not in item:
            raise PromptError(f"{examples_path}: example {i} needs 'report' and 'answer'")
        try:
            validate_answer(item["answer"])
        except ValueError as exc:
            raise PromptError(f"{examples_path}: example {i}: {exc}") from None
        answer = json.dumps(item["answer"], ensure_ascii=False)
        examples.append((str(item["report"]), answer))
    return Prompt(version=folder.name, system=system_path.read_text().strip(), examples=tuple(examples))
