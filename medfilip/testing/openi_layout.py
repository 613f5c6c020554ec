"""A tiny Open-i (Indiana University chest X-ray) tree in NLM's published layout, for tests and benchmarks.

``write_openi_tree(root)`` writes::

    root/ecgen-radiology/<n>.xml    one eCitation report per file, as in NLMCXR_reports.tgz
    root/NLMCXR_png/<id>.png        an 8x8 grayscale PNG per parentImage id, as in NLMCXR_png.tgz

The report text is synthetic (written here); the XML has the real file's elements (uId,
IUXRId, AbstractText sections, MeSH major/automatic, parentImage with figureId and caption).
``write_pngs`` puts a tiny PNG beside real reports (the real PNGs are not redistributable here).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence
from xml.sax.saxutils import escape, quoteattr

REPORTS_DIR = "ecgen-radiology"
IMAGES_DIR = "NLMCXR_png"


@dataclass(frozen=True)
class OpenIStudy:
    """One synthetic report: its file number, uId, sections, MeSH tags and parentImage ids."""

    number: int
    uid: str
    findings: str | None = None
    impression: str | None = None
    indication: str | None = None
    comparison: str | None = None
    mesh_major: tuple[str, ...] = ()
    mesh_automatic: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    caption: str | None = "Radiograph chest PA and lateral"


# What each study exercises: a normal pair, tagged findings, a report without images, a
# missing PNG with "No Indexing", and a single AP view whose tags map to nothing.
DEFAULT_STUDIES: tuple[OpenIStudy, ...] = (
    OpenIStudy(1, "CXR1", findings="Heart size normal. Lungs are clear without effusion.",
               impression="No acute disease.", indication="Routine screening.", comparison="None.",
               mesh_major=("normal",), images=("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001")),
    OpenIStudy(2, "CXR2", findings="Mild opacity at the left lung base. The heart is mildly enlarged.",
               impression="Left basilar opacity, possibly atelectasis. Mild cardiomegaly.",
               indication="Cough.", comparison="Prior study of last year.",
               mesh_major=("Opacity/lung/base/left/mild", "Cardiomegaly/mild"),
               mesh_automatic=("Pulmonary Atelectasis/base/left",),
               images=("CXR2_IM-0652-1001", "CXR2_IM-0652-2001"), caption="PA and lateral views of the chest."),
    OpenIStudy(3, "CXR3", findings="Small right pleural effusion.", impression="Right effusion.",
               mesh_major=("Pleural Effusion/right/small",), images=(), caption=None),
    OpenIStudy(4, "CXR4", findings=None, impression="Limited study.",
               mesh_major=("No Indexing",), images=("CXR4_IM-2050-1001", "CXR4_IM-2050-2001")),
    OpenIStudy(5, "CXR5", findings="Prominent epicardial fat pad. Lines overlie the chest.",
               impression="No acute process.", mesh_major=("Made Up Heading/left", "Epicardial Fat/prominent"),
               images=("CXR5_1_IM-2126-1001",), caption="AP portable chest"),
)
# A parentImage of DEFAULT_STUDIES whose PNG is left out (NLM's PNG archive misses a few too).
DEFAULT_MISSING_PNG = ("CXR4_IM-2050-2001",)


def openi_xml(study: OpenIStudy) -> str:
    """The report as NLM's eCitation XML (the elements the importer and readers look at, in order)."""
    sections = "".join(
        f'\n            <AbstractText Label="{label}">{escape(text or "")}</AbstractText>'
        for label, text in (("COMPARISON", study.comparison), ("INDICATION", study.indication),
                            ("FINDINGS", study.findings), ("IMPRESSION", study.impression))
    )
    mesh = "".join(f"\n      <major>{escape(t)}</major>" for t in study.mesh_major)
    mesh += "".join(f"\n      <automatic>{escape(t)}</automatic>" for t in study.mesh_automatic)
    images = "".join(
        f"""
   <parentImage id={quoteattr(image_id)}>
      <figureId>F{i}</figureId>
      {f"<caption>{escape(study.caption)}</caption>" if study.caption is not None else ""}
      <panel type="single">
         <url>/hadoop/storage/radiology/extract/{escape(image_id)}.jpg</url>
         <imgModality>7</imgModality>
      </panel>
   </parentImage>"""
        for i, image_id in enumerate(study.images, start=1)
    )
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id={quoteattr(study.uid)}/>
   <pmcId id="{study.number}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{study.number}"/>
   <licenseType>open-access</licenseType>
   <title>Synthetic chest X-ray collection</title>
   <MedlineCitation Owner="test" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <ArticleTitle>Synthetic chest X-ray collection</ArticleTitle>
         <Abstract>{sections}
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>{mesh}
   </MeSH>{images}
</eCitation>
"""


def tiny_png(size: int = 8) -> bytes:
    """An ``size`` x ``size`` 8-bit grayscale PNG (a gradient, so it is not blank)."""
    from PIL import Image

    image = Image.new("L", (size, size))
    image.putdata([(x * 16 + y * 8) % 256 for y in range(size) for x in range(size)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_pngs(folder: str | Path, image_ids: Iterable[str]) -> int:
    """One tiny PNG ``<id>.png`` per image id in ``folder``; returns how many were written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data, n = tiny_png(), 0
    for image_id in image_ids:
        (folder / f"{image_id}.png").write_bytes(data)
        n += 1
    return n


def write_openi_tree(root: str | Path, studies: Sequence[OpenIStudy] = DEFAULT_STUDIES,
                     missing_png: Iterable[str] = DEFAULT_MISSING_PNG) -> Path:
    """Write ``studies`` as ``root/ecgen-radiology/<number>.xml`` and their PNGs (but ``missing_png``)."""
    root = Path(root)
    reports = root / REPORTS_DIR
    reports.mkdir(parents=True, exist_ok=True)
    for study in studies:
        (reports / f"{study.number}.xml").write_text(openi_xml(study), encoding="utf-8")
    skip = set(missing_png)
    write_pngs(root / IMAGES_DIR, (i for s in studies for i in s.images if i not in skip))
    return root
