"""Decode, window and resize every image once into a memory-mappable uint8 store.

The ``pixels`` stage turns ``data/interim/images.parquet`` into

* ``pixels.npy`` – an ``(N, S, S)`` uint8 ``.npy`` file (self-describing, opened with
  ``np.load(..., mmap_mode="r")``), row ``i`` holding the image of row ``i`` of the
  input table, and
* ``index.parquet`` – ``image_id, study_id, path, row, ok, error, orig_height,
  orig_width``, one row per input row in the same order.

The trainer opens both through :class:`PixelStore` and never decodes an image in its
training loop. An image that cannot be read either stops the stage (``on_error:
fail``, nothing partial left behind) or is recorded with ``ok=False`` and its error
and stored as zeros (``on_error: skip``); no row is ever dropped silently.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.lib.format import open_memmap
from PIL import Image, ImageOps
from tqdm import tqdm

from medfilip.config import PixelsParams

PIXELS_FILE = "pixels.npy"
INDEX_FILE = "index.parquet"
# Fixed (not per-process) names so a killed run's leftovers are overwritten, not piled up.
PARTIAL_SUFFIX = ".partial"

# Robust window for >8-bit images that carry no window of their own. Raw radiographs put
# collimator edges, burned-in labels and dead/hot pixels at the extremes of the range;
# clipping the outer 0.5 % on each side ignores them and spreads the anatomy over 0..255.
DEFAULT_PERCENTILES = (0.5, 99.5)

# ITU-R BT.601 luma, the weights PIL's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114])

_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
_MAX_FAILURES_IN_SUMMARY = 100


class PixelError(RuntimeError):
    """An image that cannot be turned into pixels; the message names the file and what to do."""


# --------------------------------------------------------------------------- decoding


def load_image(path: Path, *, draft_size: Optional[int] = None) -> np.ndarray:
    """Decode one image file to a 2-D grayscale array (PNG/JPEG/TIFF, 8 or 16 bit, or DICOM).

    Returns uint8 when the source is 8-bit or a DICOM file carries its own display
    window (VOI LUT or Window Center/Width, already applied); otherwise the wider raw
    values (uint16/int32/float32) for :func:`to_uint8` to window. DICOM MONOCHROME1 is
    inverted so that more X-ray attenuation is always brighter. ``draft_size`` lets
    JPEG decode at a reduced scale that is still at least that many pixels per side.
    """
    return _decode(Path(path), draft_size)[0]


def _decode(path: Path, draft_size: Optional[int] = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``path``; return the grayscale array and the original (height, width)."""
    try:
        # One open per image: sniff the DICOM magic, then hand the same handle to the decoder.
        with open(path, "rb") as fh:
            has_magic = fh.read(132)[128:132] == b"DICM"
            fh.seek(0)
            if has_magic or path.suffix.lower() in _DICOM_SUFFIXES:
                img = _decode_dicom(fh, path, has_magic)
                return img, (int(img.shape[0]), int(img.shape[1]))
            return _decode_pil(fh, path, draft_size)
    except FileNotFoundError:
        raise PixelError(f"image file not found: {path}") from None
    except (PixelError, ImportError):
        # ImportError is an environment problem, not a bad image: never record it per image.
        raise
    except Exception as exc:  # PIL and pydicom raise many types for one problem: a bad file
        raise PixelError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc


def _decode_pil(
    fh: BinaryIO, path: Path, draft_size: Optional[int]
) -> tuple[np.ndarray, tuple[int, int]]:
    with Image.open(fh) as im:
        width, height = im.size
        orientation = im.getexif().get(0x0112, 1)  # EXIF orientation; 1 = as stored
        if draft_size is not None and im.format == "JPEG":
            # DCT-domain downscaling: decodes a 3000 px radiograph several times faster.
            im.draft("L", (2 * draft_size, 2 * draft_size))
        if orientation not in (None, 1):
            im = ImageOps.exif_transpose(im)
            if orientation in (5, 6, 7, 8):  # 90-degree turns swap the axes
                width, height = height, width
        mode = im.mode
        if mode in ("L", "I", "F") or mode.startswith("I;16"):
            img = np.asarray(im)
            if not img.dtype.isnative:  # I;16B
                img = img.astype(img.dtype.newbyteorder("="))
        else:  # RGB, RGBA, LA, P, 1, CMYK, YCbCr: BT.601 luminance
            img = np.asarray(im.convert("L"))
    if img.ndim != 2:
        raise PixelError(f"{path}: expected a 2-D grayscale image, got shape {img.shape}")
    return img, (height, width)


def _decode_dicom(fh: BinaryIO, path: Path, has_magic: bool) -> np.ndarray:
    try:
        import pydicom
    except ImportError as exc:
        raise ImportError(
            f"{path} is a DICOM file and reading it needs pydicom: "
            "pip install 'medfilip[dicom]'"
        ) from exc
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    # force: a .dcm file without the 128-byte preamble (old ACR-NEMA style) is still DICOM.
    ds = pydicom.dcmread(fh, force=not has_magic)
    if "PixelData" not in ds:
        raise PixelError(f"{path}: DICOM file has no pixel data (not an image object?)")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1:
        raise PixelError(
            f"{path}: multi-frame DICOM ({n_frames} frames) is not a single radiograph; "
            "export the frame you want as its own file"
        )
    arr = ds.pixel_array
    if int(getattr(ds, "SamplesPerPixel", 1)) > 1:  # colour (pydicom returns RGB)
        lum = arr[..., :3] @ _LUMA
        return np.rint(lum).astype(np.uint8) if arr.dtype == np.uint8 else lum.astype(np.float32)

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)  # Rescale Slope/Intercept
    invert = str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1"

    unit = None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        def voi(x: np.ndarray) -> np.ndarray:
            return np.asarray(apply_voi_lut(x, ds, index=0, prefer_lut=True), dtype=np.float64)

        n_entries, first_mapped = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
        n_entries = n_entries or 65536  # 0 means 2**16 entries
        # Normalise by the LUT's own output range, not its descriptor's bit depth (often wrong).
        lut_out = voi(np.arange(first_mapped, first_mapped + n_entries, dtype=np.int64))
        lo, hi = float(lut_out.min()), float(lut_out.max())
        out = voi(np.rint(values).astype(np.int64))
        unit = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if width > 0 and not (function == "LINEAR" and width < 1):
            unit = window_unit(values, center, width, function)
    if unit is None:
        # No usable display window: keep the raw values for the percentile window.
        if invert:
            values = values.max() + values.min() - values
        return values.astype(np.float32)
    u8 = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return 255 - u8 if invert else u8


def _first(value: Any) -> float:
    """Window Center/Width may be multi-valued; the first pair is the default view."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def window_unit(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Map values through a DICOM VOI window to [0, 1].

    DICOM PS3.3 C.11.2.1.2: ``function`` is LINEAR (default), LINEAR_EXACT or SIGMOID.
    """
    x = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:  # LINEAR with width 1 is a threshold at center - 0.5
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def to_uint8(
    img: np.ndarray,
    window: Optional[tuple[float, float]] = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> np.ndarray:
    """Convert an image to uint8: uint8 passes unchanged, wider data is windowed.

    ``window=(center, width)`` applies that DICOM linear window. Without one the window
    is the robust ``percentiles`` range of the image itself (0.5-99.5 % by default),
    which ignores burned-in labels, collimator edges and hot pixels at the extremes;
    if that range is empty (near-binary image) the full min-max range is used, and a
    constant image becomes all zeros.
    """
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    if img.ndim != 2:
        raise ValueError(f"to_uint8 expects a 2-D grayscale image, got shape {img.shape}")
    values = img.astype(np.float64)
    if window is not None:
        unit = window_unit(values, float(window[0]), float(window[1]))
    else:
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return np.zeros(img.shape, np.uint8)
        lo, hi = np.percentile(finite, percentiles)
        if hi <= lo:
            lo, hi = finite.min(), finite.max()
        if hi <= lo:
            return np.zeros(img.shape, np.uint8)
        unit = (values - lo) / (hi - lo)
    unit = np.nan_to_num(np.clip(unit, 0.0, 1.0), nan=0.0)
    return np.rint(unit * 255.0).astype(np.uint8)


def resize_square(img_u8: np.ndarray, size: int) -> np.ndarray:
    """Resize keeping the aspect ratio (LANCZOS, antialiased); letterbox-pad with 0 to size×size.

    The longer side becomes ``size``; the image is centred, the padding split evenly
    (the extra pixel, if any, goes to the bottom/right).
    """
    img_u8 = np.asarray(img_u8)
    if img_u8.dtype != np.uint8 or img_u8.ndim != 2:
        raise ValueError(
            f"resize_square expects a 2-D uint8 image, got {img_u8.dtype} {img_u8.shape}"
        )
    h, w = img_u8.shape
    if h == 0 or w == 0:
        raise ValueError(f"resize_square got an empty image of shape {img_u8.shape}")
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) == (h, w):
        resized = img_u8
    else:
        resized = np.asarray(
            Image.fromarray(img_u8).resize((new_w, new_h), Image.Resampling.LANCZOS)
        )
    out = np.zeros((size, size), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def _decode_task(
    task: tuple[int, str, int],
) -> tuple[int, Optional[np.ndarray], Optional[str], int, int]:
    """Worker: decode one image to its stored form; a bad image comes back as an error string."""
    pos, path, size = task
    try:
        img, (orig_h, orig_w) = _decode(Path(path), draft_size=size)
        return pos, resize_square(to_uint8(img), size), None, orig_h, orig_w
    except PixelError as exc:
        return pos, None, str(exc), -1, -1


# --------------------------------------------------------------------------- building


def build_pixel_store(
    images: pa.Table,
    out_dir: Path,
    params: PixelsParams,
    base_dir: Path = Path("."),
    *,
    progress: bool = True,
) -> dict:
    """Decode every row of ``images`` (image_id, study_id, path) into ``out_dir``; return a summary.

    Relative paths are resolved against ``base_dir``. Rows keep the table's order
    (``index.row`` == position). Output files are written under temporary names and
    renamed at the end, so a failed run leaves no partial store behind.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    size = params.image_size
    image_ids, study_ids, paths = _validated_columns(images)
    if params.workers < 1:
        raise ValueError(f"pixels.workers must be >= 1, got {params.workers}")
    resolved = [None if p is None else str(Path(base_dir) / p) for p in paths]
    n = len(image_ids)

    out_dir.mkdir(parents=True, exist_ok=True)
    partial_pixels = out_dir / (PIXELS_FILE + PARTIAL_SUFFIX)
    partial_index = out_dir / (INDEX_FILE + PARTIAL_SUFFIX)
    ok = np.zeros(n, dtype=bool)
    errors: list[Optional[str]] = [None] * n
    orig_h = np.full(n, -1, dtype=np.int32)
    orig_w = np.full(n, -1, dtype=np.int32)
    pixels = None
    try:
        pixels = open_memmap(partial_pixels, mode="w+", dtype=np.uint8, shape=(n, size, size))
        tasks = [(i, p, size) for i, p in enumerate(resolved) if p is not None]
        for i, p in enumerate(resolved):
            if p is None:
                errors[i] = f"image {image_ids[i]!r} has no path in the images table"
        if params.on_error == "fail" and any(errors):
            first = next(i for i, e in enumerate(errors) if e)
            raise PixelError(_fail_message(image_ids[first], None, errors[first]))
        with _decoded(tasks, params.workers) as results:
            bar = tqdm(results, total=len(tasks), desc="pixels", unit="img", disable=not progress)
            for pos, img, error, h, w in bar:
                if error is not None:
                    if params.on_error == "fail":
                        raise PixelError(_fail_message(image_ids[pos], resolved[pos], error))
                    errors[pos] = error
                    pixels[pos] = 0
                    continue
                pixels[pos] = img
                ok[pos] = True
                orig_h[pos], orig_w[pos] = h, w
        pixels.flush()
        pixels = None  # close the map before the rename (required on Windows)

        index = pa.table(
            {
                "image_id": pa.array(image_ids, pa.string()),
                "study_id": pa.array(study_ids, pa.string()),
                "path": pa.array(paths, pa.string()),
                "row": pa.array(np.arange(n, dtype=np.int64)),
                "ok": pa.array(ok),
                "error": pa.array(errors, pa.string()),
                "orig_height": pa.array(orig_h, mask=~ok),
                "orig_width": pa.array(orig_w, mask=~ok),
            }
        )
        pq.write_table(index, partial_index)
        os.replace(partial_pixels, out_dir / PIXELS_FILE)
        os.replace(partial_index, out_dir / INDEX_FILE)
    except BaseException:
        pixels = None
        partial_pixels.unlink(missing_ok=True)
        partial_index.unlink(missing_ok=True)
        raise

    seconds = time.perf_counter() - start
    failures = [
        {"image_id": image_ids[i], "path": paths[i], "error": errors[i]}
        for i in np.flatnonzero(~ok)[:_MAX_FAILURES_IN_SUMMARY]
    ]
    return {
        "n_images": n,
        "n_ok": int(ok.sum()),
        "n_failed": int(n - ok.sum()),
        "failures": failures,
        "image_size": size,
        "workers": params.workers,
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 2) if seconds > 0 else 0.0,
    }


def _validated_columns(
    images: pa.Table,
) -> tuple[list[str], list[Optional[str]], list[Optional[str]]]:
    missing = [c for c in ("image_id", "study_id", "path") if c not in images.column_names]
    if missing:
        raise ValueError(
            f"images table lacks column(s) {missing}; expected the columns of "
            "data/interim/images.parquet (image_id, study_id, path, view)"
        )
    image_ids = images.column("image_id").to_pylist()
    if any(i is None for i in image_ids):
        row = image_ids.index(None)
        raise ValueError(f"images table: image_id is null in row {row}; every image needs an id")
    image_ids = [str(i) for i in image_ids]
    dupes = sorted(i for i, count in Counter(image_ids).items() if count > 1)
    if dupes:
        shown = ", ".join(repr(d) for d in dupes[:5]) + (" ..." if len(dupes) > 5 else "")
        raise ValueError(
            f"images table has {len(dupes)} duplicate image_id(s): {shown}; "
            "each image must appear once (fix the ingest step that wrote the table)"
        )
    study_ids = [None if s is None else str(s) for s in images.column("study_id").to_pylist()]
    paths = [None if p is None else str(p) for p in images.column("path").to_pylist()]
    return image_ids, study_ids, paths


def _fail_message(image_id: str, path: Optional[str], error: str) -> str:
    where = f" ({path})" if path else ""
    return (
        f"image {image_id!r}{where}: {error}\n"
        "Fix or remove the file (and its row in data/interim/images.parquet), or set "
        "`pixels.on_error: skip` in params.yaml to record the failure and continue. "
        "No pixel store was written."
    )


@contextlib.contextmanager
def _decoded(tasks: list[tuple[int, str, int]], workers: int) -> Iterator[Iterable[tuple]]:
    """Yield decoded results in task order: in-process for one worker, else a process pool."""
    workers = min(workers, len(tasks))
    if workers <= 1:
        yield map(_decode_task, tasks)
        return
    # spawn, not fork: the parent may hold threads (pyarrow, tqdm) that fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    # Ordered imap: chunks big enough to amortise IPC, small enough to keep all workers busy.
    chunksize = max(1, min(32, len(tasks) // (workers * 8)))
    with ctx.Pool(workers) as pool:  # __exit__ terminates the workers, also on an early failure
        yield pool.imap(_decode_task, tasks, chunksize=chunksize)


# --------------------------------------------------------------------------- reading


class PixelStore:
    """Read side of the pixel store: a read-only memmap of (N, S, S) uint8 plus its index."""

    def __init__(self, out_dir: Path, array: np.ndarray, index: pa.Table) -> None:
        self.out_dir = Path(out_dir)
        self.array = array
        self.index = index
        self.ok = index.column("ok").to_numpy(zero_copy_only=False).astype(bool)
        self._rows: Optional[dict[str, int]] = None

    @classmethod
    def open(cls, out_dir: Path) -> "PixelStore":
        """Open a store written by :func:`build_pixel_store` (pixels memory-mapped, not loaded)."""
        out_dir = Path(out_dir)
        pixels_path, index_path = out_dir / PIXELS_FILE, out_dir / INDEX_FILE
        for p in (pixels_path, index_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found: run the `pixels` stage (dvc repro pixels)")
        array = np.load(pixels_path, mmap_mode="r")
        index = pq.read_table(index_path)
        if array.ndim != 3 or array.dtype != np.uint8 or array.shape[1] != array.shape[2]:
            raise ValueError(
                f"{pixels_path}: expected (N, S, S) uint8, got {array.dtype} {array.shape}"
            )
        if array.shape[0] != index.num_rows:
            raise ValueError(
                f"{out_dir}: {PIXELS_FILE} has {array.shape[0]} rows but {INDEX_FILE} has "
                f"{index.num_rows}; the store is inconsistent, rebuild it (dvc repro -f pixels)"
            )
        return cls(out_dir, array, index)

    def __reduce__(self):
        # Pickling (DataLoader workers) reopens the memmap instead of copying every pixel.
        return (PixelStore.open, (self.out_dir,))

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.array.shape[1])

    def row_of(self, image_id: str) -> int:
        """Row of ``image_id`` in :attr:`array` (== its position in images.parquet)."""
        if self._rows is None:
            ids = self.index.column("image_id").to_pylist()
            self._rows = {image_id: row for row, image_id in enumerate(ids)}
        try:
            return self._rows[image_id]
        except KeyError:
            raise KeyError(
                f"image_id {image_id!r} is not in the pixel store {self.out_dir}; "
                "rebuild it if images.parquet changed (dvc repro pixels)"
            ) from None

    def get(self, image_id: str) -> np.ndarray:
        """The S×S uint8 pixels of one image; a failed (ok=False) image raises PixelError."""
        row = self.row_of(image_id)
        if not self.ok[row]:
            error = self.index.column("error")[row].as_py()
            raise PixelError(
                f"image {image_id!r} failed to decode when the store was built: {error}; "
                "select images with PixelStore.ok"
            )
        return self.array[row]


# --------------------------------------------------------------------------- benchmark


def benchmark(n_images: int = 300, image_size: int = 224, workers: int = 1) -> dict:
    """Images/s of :func:`build_pixel_store` on synthetic 256 px 8-bit PNGs in a temp dir."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    with tempfile.TemporaryDirectory(prefix="medfilip-pixels-bench-") as tmp:
        tmp = Path(tmp)
        ids, paths = [], []
        for i in range(n_images):
            # A smooth body plus noise: compresses like a radiograph, not like a flat test card.
            body = 128 + 80 * np.sin(xx / (20 + i % 7)) * np.cos(yy / 31)
            img = np.clip(body + rng.normal(0, 12, body.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp / f"img{i:05d}.png")
            ids.append(f"img{i:05d}")
            paths.append(f"img{i:05d}.png")
        table = pa.table({"image_id": ids, "study_id": ids, "path": paths})
        params = PixelsParams(image_size=image_size, on_error="fail", workers=workers)
        summary = build_pixel_store(table, tmp / "store", params, base_dir=tmp, progress=False)
    return {
        "n_images": n_images,
        "image_size": image_size,
        "workers": workers,
        "seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
    }
