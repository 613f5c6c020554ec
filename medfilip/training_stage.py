"""What the `train` stage reads and logs around :func:`medfilip.train.fit`: the pipeline's files in,
the model directory, ``reports/train.json`` and dvclive's metrics and plots out."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Optional

from medfilip.config import Params
from medfilip.knowledge import knowledge_base, unseen_classes
from medfilip.model import load_tokenizer
from medfilip.pixels import PixelStore
from medfilip.prompts import class_prompts
from medfilip.ssm import load_embedding_table
from medfilip.train import TrainData, fit, model_config
from medfilip.trainset import load_training_index
from medfilip.vocab import load_vocabulary

INTERIM, PROCESSED = Path("data/interim"), Path("data/processed")
PIXELS = PROCESSED / "pixels"
_FINGERPRINTED = [INTERIM / "images.parquet", INTERIM / "studies.parquet", PROCESSED / "labels.parquet",
                  PROCESSED / "texts.parquet", PROCESSED / "embeddings.parquet", PIXELS / "index.parquet"]
# The code that shapes the weights: a change to any of it starts a fresh run, never a resume.
_CODE = [Path(__file__).parent / name for name in
         ("train.py", "trainset.py", "model.py", "loss.py", "ssm.py", "distributed.py", "prompts.py")]
LOGGED = ("loss", "mse", "ce", "bce", "lr", "val_auc", "img_per_s", "logit_scale")


def input_fingerprint(paths: list[Path], extra: str = "") -> str:
    """Content hash of the (small) inputs a run trains on: a changed input never resumes an old run."""
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_train_data(params: Params) -> "TrainData":
    """The training index, label vectors, tokenizer and val prompts, built once."""
    tp = params.train
    store = PixelStore.open(PIXELS)
    unseen = unseen_classes(params.knowledge.dictionary)
    index = load_training_index(PROCESSED, INTERIM, store.ok, uncertain=tp.uncertain, unseen_classes=unseen)
    embeddings, rows = load_embedding_table(PROCESSED / "embeddings.parquet")
    assert list(rows) == index.text_ids  # the index is built in the embedding table's order
    explanations, _ = knowledge_base(params.knowledge, load_vocabulary(params.normalize.vocabulary))
    negated = {index.categories[c] for c in index.text_category[index.text_negated] if c >= 0}
    val_classes = [c for c in index.categories if c not in negated and c not in unseen and c in explanations]
    prompts = class_prompts(val_classes, "explanation", {c: e.text for c, e in explanations.items()}, params.explain)
    return TrainData(index=index, store=store, embeddings=embeddings, tokenizer=load_tokenizer(model_config(tp)),
                     val_classes=val_classes, val_prompts=prompts, same_category_only=params.ssm.same_category_only)


def run_train_stage(params: Params, model_dir: Path, live_dir: Optional[Path] = None,
                    stop_after_epochs: Optional[int] = None) -> Optional[dict]:
    """Train (or resume) and return the summary for reports/train.json (None on non-main ranks)."""
    started = time.perf_counter()
    data = load_train_data(params)
    fingerprint = input_fingerprint(_FINGERPRINTED + _CODE, extra=f"{data.store.array.shape}|{params.ssm.same_category_only}")
    live = None
    is_main = _is_main_rank()
    if live_dir is not None and is_main:
        from dvclive import Live

        live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)

    def log_epoch(row: dict) -> None:
        for key in LOGGED:
            if key in row and row[key] is not None and not (isinstance(row[key], float) and math.isnan(row[key])):
                live.log_metric(f"train/{key}" if key not in ("val_auc",) else "val/auc", row[key])
        live.next_step()

    result = fit(params.train, data, model_dir, fingerprint, log_epoch=log_epoch if live else None,
                 stop_after_epochs=stop_after_epochs)
    if live is not None:
        live.end()
    if not is_main:
        return None
    epochs = result["epochs"]
    return {
        "seconds": round(time.perf_counter() - started, 1),  # this invocation (a resume is short)
        "train_seconds_all_epochs": round(sum(e["seconds"] for e in epochs), 1),
        "resumed": result["resumed_from_epoch"],
        "device": result["device"],
        "world_size": result["world_size"],
        "finished": result["finished"],
        "best_epoch": result["best_epoch"],
        "best_val_auc": result["best_val_auc"],
        "first_epoch": epochs[0] if epochs else None,
        "last_epoch": epochs[-1] if epochs else None,
        "steps_per_epoch": result["steps_per_epoch"],
        "val_classes": data.val_classes,
        "index": result["index"],
        "params": {"targets": params.train.targets, "loss": params.train.loss, "uncertain": params.train.uncertain,
                   "image_encoder": params.train.image_encoder, "text_encoder": params.train.text_encoder},
    }


def _is_main_rank() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
