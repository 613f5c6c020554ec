"""A tiny COVID-19 Radiography Database tree in the published (Kaggle v4+) layout, for tests and benchmarks.

Folder and file names follow the download; images and lung masks are 8x8 grey PNGs, the
metadata spreadsheets are placeholders (the importer never reads them).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

COVID_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


def write_covid(folder: Path, *, per_class: dict[str, int] | None = None, flat: bool = False) -> Path:
    """Write ``folder/COVID-19_Radiography_Dataset/`` and return it (the ``data.root`` to use).

    ``per_class`` gives the number of images of each class (default 3, 2, 4, 1 in
    :data:`COVID_CLASSES` order); ``flat`` writes the older layout with the PNGs directly in
    the class folder and no masks.
    """
    counts = per_class or dict(zip(COVID_CLASSES, (3, 2, 4, 1), strict=True))
    root = Path(folder) / "COVID-19_Radiography_Dataset"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(19)
    for name, n in counts.items():
        image_dir = root / name if flat else root / name / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        if not flat:
            (root / name / "masks").mkdir(exist_ok=True)
        for i in range(1, n + 1):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(image_dir / f"{name}-{i}.png")
            if not flat:
                mask = np.zeros((8, 8), np.uint8)
                mask[2:6, 1:3] = mask[2:6, 5:7] = 255
                Image.fromarray(mask).save(root / name / "masks" / f"{name}-{i}.png")
        # The real file is an Excel workbook (FILE NAME, FORMAT, SIZE, URL): a zip container.
        with zipfile.ZipFile(root / f"{name}.metadata.xlsx", "w") as book:
            book.writestr("xl/workbook.xml", "<workbook/>")
    (root / "README.md.txt").write_text("COVID-19 Radiography Database (tiny test stand-in)\n")
    return root
