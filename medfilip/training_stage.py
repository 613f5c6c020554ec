"""What the `train` stage reads and logs around :func:`medfilip.train.fit`: the pipeline's files in,
the model directory, ``reports/train.json`` and dvclive's metrics and plots out."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Optional

from medfilip.config import Params
from medfilip.diagnostics import flags, replay_targets, similarity_figure, text_counts, text_lengths
from medfilip.knowledge import knowledge_base, unseen_classes
from medfilip.model import load_tokenizer
from medfilip.pixels import PixelStore
from medfilip.prompts import class_prompts
from medfilip.reporting import write_json
from medfilip.ssm import (Calibration, load_embedding_table, sharpen_temperature, similarity_floor,
                          similarity_summary)
from medfilip.train import TrainData, fit, model_config
from medfilip.trainset import load_training_index
from medfilip.vocab import load_vocabulary

INTERIM, PROCESSED = Path("data/interim"), Path("data/processed")
PIXELS = PROCESSED / "pixels"
_FINGERPRINTED = [INTERIM / "images.parquet", INTERIM / "studies.parquet", PROCESSED / "labels.parquet",
                  PROCESSED / "texts.parquet", PROCESSED / "embeddings.parquet", PIXELS / "index.parquet"]
# The code that shapes the weights: a change to any of it starts a fresh run, never a resume.
_CODE = [Path(__file__).parent / name for name in
         ("train.py", "trainset.py", "model.py", "loss.py", "ssm.py", "distributed.py", "prompts.py",
          "training_stage.py")]
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
    prompts = class_prompts(val_classes, "training", {c: e.text for c, e in explanations.items()}, params.explain)
    return TrainData(index=index, store=store, embeddings=embeddings, tokenizer=load_tokenizer(model_config(tp)),
                     val_classes=val_classes, val_prompts=prompts, same_category_only=params.ssm.same_category_only,
                     calibration=ssm_calibration(params, index, embeddings))


def ssm_calibration(params: Params, index, embeddings) -> Optional[Calibration]:
    """``ssm.calibration`` with its floor or temperature: from params, or measured on the training
    labels when it is null (None: the raw cosines)."""
    ssm = params.ssm
    if ssm.calibration == "raw":
        return None
    counts = text_counts(index)
    if ssm.calibration == "rescale":
        floor = ssm.floor if ssm.floor is not None else similarity_floor(embeddings, index.text_category, counts,
                                                                          ssm.floor_quantile)
        return Calibration("rescale", float(floor))
    temperature = ssm.temperature if ssm.temperature is not None else sharpen_temperature(
        embeddings, index.text_category, counts, ssm.temperature_quantile)
    return Calibration("sharpen", float(temperature))


def _marked_cosine(calibration: Optional[Calibration]) -> Optional[float]:
    """The cosine drawn on the similarity figure: target 0 (rescale) or 0.5 (sharpen)."""
    if calibration is None:
        return None
    if calibration.kind == "rescale":
        return calibration.value
    return 1.0 - calibration.value * math.log(2.0)


def _calibration_source(params: Params) -> str:
    ssm = params.ssm
    if ssm.calibration == "rescale":
        return ("ssm.floor" if ssm.floor is not None else
                f"floor measured: the {ssm.floor_quantile} quantile of cross-category cosines")
    return ("ssm.temperature" if ssm.temperature is not None else
            f"temperature measured: the same-category pair at the {ssm.temperature_quantile} quantile "
            "of cosines gets target 0.5")


def write_diagnostics(params: Params, data: "TrainData", epochs: list[dict], path: Path, figure: Path) -> dict:
    """``reports/diagnostics.json``: the label texts' similarity, what the targets can teach, the
    per-epoch CE against its floor, and a sentence for each problem found."""
    tp = params.train
    counts = text_counts(data.index)
    soft = tp.targets == "ssm"
    replay = {"as_trained": replay_targets(data.index, data.embeddings.cpu(), kind=tp.targets,
                                           batch_size=tp.batch_size, seed=tp.seed,
                                           calibration=data.calibration,
                                           same_category_only=data.same_category_only)}
    if soft:  # the same batches under the paper's raw cosines, for comparison
        replay["raw_cosines"] = replay_targets(data.index, data.embeddings.cpu(), kind="ssm",
                                               batch_size=tp.batch_size, seed=tp.seed, calibration=None,
                                               same_category_only=data.same_category_only)
    report = {
        "targets": tp.targets, "loss": tp.loss,
        "ssm": {"calibration": params.ssm.calibration,
                "value": data.calibration.value if data.calibration else None,
                "value_source": _calibration_source(params) if data.calibration else None,
                "same_category_only": params.ssm.same_category_only,
                "label_text_similarity": similarity_summary(data.embeddings.cpu(), data.index.text_category,
                                                            counts, data.calibration)},
        "target_replay_first_epoch": replay,
        "text_lengths": text_lengths(data.tokenizer, data.index.texts, tp.text_max_length),
        "epochs": [{k: row.get(k) for k in ("epoch", "ce", "ce_floor", "ce_minus_floor", "ce_uniform", "ce_headroom",
                                           "mse", "logit_scale", "lr", "val_auc") if k in row} for row in epochs],
    }
    report["flags"] = flags(epochs, replay["as_trained"], soft)
    if report["text_lengths"]["n_truncated"]:
        report["flags"].append(f"{report['text_lengths']['n_truncated']} label text(s) are longer than "
                               f"train.text_max_length {tp.text_max_length} and are cut by the text tower")
    write_json(path, report)
    similarity_figure(figure, data.embeddings.cpu(), data.index.text_category, counts,
                      _marked_cosine(data.calibration))
    return report


def run_train_stage(params: Params, model_dir: Path, live_dir: Optional[Path] = None,
                    stop_after_epochs: Optional[int] = None, diagnostics: Optional[Path] = None,
                    diagnostics_figure: Optional[Path] = None) -> Optional[dict]:
    """Train (or resume) and return the summary for reports/train.json (None on non-main ranks)."""
    started = time.perf_counter()
    data = load_train_data(params)
    ssm = params.ssm
    fingerprint = input_fingerprint(_FINGERPRINTED + _CODE, extra=f"{data.store.array.shape}|{ssm.same_category_only}"
                                    f"|{data.calibration!r}")
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
    found = []
    if diagnostics is not None:
        figure = diagnostics_figure or diagnostics.with_suffix(".png")
        found = write_diagnostics(params, data, epochs, diagnostics, figure)["flags"]
        for sentence in found:
            print(f"train: warning: {sentence} ({diagnostics})")
    return {
        "seconds": round(time.perf_counter() - started, 1),  # this invocation (a resume is short)
        "train_seconds_all_epochs": round(sum(e["seconds"] for e in epochs), 1),
        "resumed": result["resumed_from_epoch"],
        "device": result["device"],
        "world_size": result["world_size"],
        "finished": result["finished"],
        "best_epoch": result["best_epoch"],
        "best_val_auc": result["best_val_auc"],
        "model_selection": result["model_selection"],
        "first_epoch": epochs[0] if epochs else None,
        "last_epoch": epochs[-1] if epochs else None,
        "steps_per_epoch": result["steps_per_epoch"],
        "val_classes": data.val_classes,
        "index": result["index"],
        "ssm_calibration": {"kind": params.ssm.calibration,
                            "value": data.calibration.value if data.calibration else None},
        "diagnostic_flags": found,
        "params": {"targets": params.train.targets, "loss": params.train.loss, "uncertain": params.train.uncertain,
                   "image_encoder": params.train.image_encoder, "text_encoder": params.train.text_encoder},
    }


def _is_main_rank() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
