"""The evaluate stage: a trained model on a dataset's reported split -> ``reports/eval/*.json``,
per-image scores and plots. Thresholds are chosen on val; the reported split is never tuned on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from medfilip.config import Params
from medfilip.errors import UserError
from medfilip.evaluate import plots
from medfilip.evaluate.probe import linear_probe
from medfilip.evaluate.truth import NORMAL, load_truth, truth_classes
from medfilip.evaluate.zeroshot import (SEVERITIES, fine_grained_report, image_embeddings, multilabel_report,
                                        retrieval_report, single_label_report, text_embeddings, unseen_report)
from medfilip.knowledge import knowledge_base
from medfilip.model import MedFILIP, load
from medfilip.pixels import PixelStore
from medfilip.prompts import PROMPT_KINDS, class_prompts, finding_prompt
from medfilip.reporting import write_json
from medfilip.train import select_device
from medfilip.vocab import load_vocabulary

SCORE_SCHEMA = pa.schema([("image_id", pa.string()), ("class", pa.string()), ("score", pa.float32()),
                          ("label", pa.bool_()), ("prompt", pa.string()), ("split", pa.string())])


def _probe_features(model: MedFILIP, store, rows: np.ndarray, batch_size: int, device) -> np.ndarray:
    from medfilip.evaluate.probe import extract_features

    return extract_features(model, store.array, rows, batch_size=batch_size, device=device)


class EvaluateError(UserError, ValueError):
    """A dataset that cannot be evaluated: names it and says what is missing."""


def evaluate_extra(params: Params, name: str, model_dir: Path, work: Path = Path("data/eval"),
                   reports: Path = Path("reports/eval")) -> dict:
    """An extra evaluation set (``evaluate.datasets``): import it and build its pixel store under
    ``data/eval/<name>/``, then write the same reports as the main dataset under ``reports/eval/<name>/``."""
    from medfilip.data.ingest import ingest
    from medfilip.pixels import build_pixel_store

    if name not in params.evaluate.datasets:
        raise EvaluateError(f"evaluate.datasets has no dataset named '{name}' "
                            f"(known: {', '.join(params.evaluate.datasets) or 'none'})")
    data = params.evaluate.datasets[name]
    interim, processed = work / name / "interim", work / name / "processed"
    ingest(data, interim)
    build_pixel_store(pq.read_table(interim / "images.parquet"), processed / "pixels", params.pixels,
                      files=pq.read_table(interim / "image_files.parquet"), progress=False)
    return evaluate_dataset(dataclasses.replace(params, data=data), model_dir, reports / name,
                            interim=interim, processed=processed, dataset=name)


def evaluate_dataset(params: Params, model_dir: Path, out: Path, *, interim: Path = Path("data/interim"),
                     processed: Path = Path("data/processed"), dataset: str = "pipeline") -> dict:
    """Every evaluation task on one dataset (the pipeline's own by default); returns the headline numbers."""
    ep = params.evaluate
    device = select_device(ep.device)
    torch.manual_seed(ep.seed)
    model = load(model_dir, device)
    store = PixelStore.open(processed / "pixels")
    explanations_full, _ = knowledge_base(params.knowledge, load_vocabulary(params.normalize.vocabulary))
    explanations = {c: e.text for c, e in explanations_full.items()}
    seen_all = [c for c, e in explanations_full.items() if not e.unseen]
    unseen_all = [c for c, e in explanations_full.items() if e.unseen]
    seen = truth_classes(interim, seen_all)
    if seen is None and not (processed / "labels.parquet").is_file():
        raise EvaluateError(
            f"dataset '{dataset}' at {params.data.root} has no ground truth: its importer found no labels "
            f"(data.source: {params.data.source}) and no report was extracted; give it labels, e.g. a "
            "manifest with reports, or an evaluation source with a labels file"
        )
    if seen is None:  # no truth file: score the seen classes the extractor labelled
        labelled = set(pq.read_table(processed / "labels.parquet", columns=["category_norm"])
                       .column("category_norm").to_pylist())
        seen = [c for c in seen_all if c in labelled]
    truth = load_truth(interim, processed, seen + unseen_all, uncertain=params.train.uncertain)
    unseen = [c for c in unseen_all if truth.labels[:, truth.column(c)].any()]

    ok = store.ok & truth.known.any(axis=1)  # an image its dataset never labelled is not scored at all
    split_rows = {s: np.flatnonzero((truth.split == s) & ok) for s in ("train", "val", ep.split)}
    rows, val_rows = split_rows[ep.split], split_rows["val"]
    if not len(rows):
        raise EvaluateError(f"dataset '{dataset}' has no usable images in its '{ep.split}' split "
                            f"(splits: {dict(zip(*np.unique(truth.split.astype(str), return_counts=True)))}); "
                            "nothing to report")
    emb = {s: image_embeddings(model, store.array, split_rows[s], ep.batch_size, device) for s in ("val", ep.split)}

    # ---- zero-shot, three prompt kinds
    reports, score_tables, test_scores_by_kind = {}, [], {}
    unseen_scores = {}
    for kind in PROMPT_KINDS:
        prompts = class_prompts(seen, kind, explanations, params.explain)
        text = text_embeddings(model, prompts)
        test_scores, val_scores = emb[ep.split] @ text.T, emb["val"] @ text.T
        reports[kind] = multilabel_report(test_scores, truth, rows, val_scores, val_rows, seen,
                                          n_boot=ep.n_bootstrap, seed=ep.seed, split=ep.split)
        score_tables.append(_score_table(truth, rows, seen, test_scores, kind, ep.split))
        test_scores_by_kind[kind] = test_scores
        if kind == "explanation":
            headline_scores, headline_text = test_scores, text
        if kind in ("name", "explanation") and unseen:
            unseen_text = text_embeddings(model, class_prompts(unseen, kind, explanations, params.explain))
            unseen_scores[kind] = emb[ep.split] @ unseen_text.T
            score_tables.append(_score_table(truth, rows, unseen, unseen_scores[kind], kind, ep.split))
    zeroshot = {**reports["explanation"], "prompt": "explanation", "truth_source": truth.source,
                "by_prompt": {k: {key: v for key, v in r.items() if key != "threshold_protocols"}
                              for k, r in reports.items()}}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "zeroshot.json", zeroshot)
    pq.write_table(pa.concat_tables(score_tables), out / "zeroshot_scores.parquet")

    single = {kind: single_label_report(s, truth, rows, seen) for kind, s in test_scores_by_kind.items()}
    write_json(out / "single_label.json", {"split": ep.split, "by_prompt": single})

    # Severity prompts in the IKI form (headline) and in the style the model was trained on.
    graded = [c for c in seen if c != NORMAL and any(c == k[1] for k in truth.severity)]
    fg_keys = [(s, c) for c in graded for s in SEVERITIES]
    fine_by_kind = {}
    for kind in ("explanation", "training"):
        fg_texts = [finding_prompt(c, s, kind, explanations, params.explain) for (s, c) in fg_keys]
        fg_emb = text_embeddings(model, fg_texts) if fg_texts else np.zeros((0, model.cfg.embed_dim))
        fine_by_kind[kind] = fine_grained_report(emb[ep.split], truth, rows, graded,
                                                 {k: fg_emb[i] for i, k in enumerate(fg_keys)},
                                                 n_boot=ep.n_bootstrap, seed=ep.seed)
        # category-mode prompts name no severity: the three options are one text, the task is moot
        fine_by_kind[kind]["prompts_name_severity"] = len(set(fg_texts)) == len(fg_texts)
        fine_by_kind[kind]["example_prompts"] = fg_texts[:3]
    fine = fine_by_kind["explanation"]
    write_json(out / "fine_grained.json", {"split": ep.split, "prompt": "explanation", **fine,
                                           "by_prompt": fine_by_kind})

    unseen_json = unseen_report(unseen_scores, truth, rows, unseen) if unseen else {}
    # ARCHITECTURE.md: one entry per unseen class at the top level, beside the split it comes from.
    write_json(out / "unseen.json", {"split": ep.split, **unseen_json})

    # ---- retrieval: test images against the class prompts of their labels (explanation kind)
    cols = [truth.column(c) for c in seen]
    labels_test = truth.labels[rows][:, cols]
    # One ranking for P@1..max(k): the reported ks and the curve come from the same numbers.
    curve_k = tuple(range(1, max(ep.retrieval_k) + 1))
    curves = retrieval_report(emb[ep.split], labels_test, headline_text, np.eye(len(seen), dtype=bool), ks=curve_k)
    retrieval = {**curves, **{d: {f"p@{k}": curves[d][f"p@{k}"] for k in ep.retrieval_k} for d in ("i2t", "t2i")}}
    write_json(out / "retrieval.json", {"split": ep.split, **retrieval})

    # ---- linear probe: frozen encoder features once; trained vs randomly initialised encoder
    probe_rows = {s: split_rows[s] for s in ("train", ep.split)}
    torch.manual_seed(ep.seed)
    random_model = MedFILIP(dataclasses.replace(model.cfg, image_pretrained=False)).to(device).eval()
    probe = {}
    if not len(probe_rows["train"]) or not len(rows):
        write_json(out / "probe.json", {"split": ep.split, "skipped": f"dataset '{dataset}' has no train split "
                                        "to fit a probe on", "classes": seen})
        probe_pairs = ()
    else:
        probe_pairs = (("pretrained", model), ("random_init", random_model))
    for name, m in probe_pairs:
        x = {s: _probe_features(m, store, r, ep.batch_size, device) for s, r in probe_rows.items()}
        probe[name] = linear_probe(x["train"], truth.labels[probe_rows["train"]][:, cols], x[ep.split],
                                   labels_test, fractions=tuple(ep.probe_fractions), seeds=tuple(ep.probe_seeds))
    if probe:
        write_json(out / "probe.json", {**probe["pretrained"], "random_init": probe["random_init"],
                                        "split": ep.split, "classes": seen})

    # ---- plots
    plot_dir = out / "plots"
    plots.write_curves(plot_dir, headline_scores, labels_test, truth.known[rows][:, cols], seen)
    plots.write_precision_curves(plot_dir / "retrieval",
                                {d: [curves[d][f"p@{k}"] for k in curve_k] for d in ("i2t", "t2i")})
    shown = rows[: min(len(rows), 48)]
    plots.similarity_heatmap(plot_dir / "similarity_heatmap.png", headline_scores[: len(shown)])
    _case_study(plot_dir / "case_study.png", model, store, truth, rows, seen, explanations, params, ep)

    return {
        "dataset": dataset, "split": ep.split, "n_images": int(len(rows)), "truth_source": truth.source,
        "mean_auc": {k: r["mean_auc"] for k, r in reports.items()},
        "mean_auc_ci": {k: r["mean_auc_ci"] for k, r in reports.items()},
        "fine_grained_severity_accuracy": fine["severity_accuracy"],
        "fine_grained_severity_accuracy_ci": fine["severity_accuracy_ci"],
        "fine_grained_severity_accuracy_training": fine_by_kind["training"]["severity_accuracy"],
        "fine_grained_severity_majority_baseline": fine["severity_majority_baseline"],
        "retrieval_chance": retrieval["chance"],
        "unseen": unseen_json, "retrieval": {d: retrieval[d] for d in ("i2t", "t2i")},
    }


def _score_table(truth, rows, classes, scores, kind, split) -> pa.Table:
    cols = [truth.column(c) for c in classes]
    labels = truth.labels[rows][:, cols]
    known = truth.known[rows][:, cols]
    n, c = scores.shape
    label = pa.array(labels.reshape(-1), mask=~known.reshape(-1))
    return pa.table({
        "image_id": np.repeat(np.array(truth.image_ids, dtype=object)[rows], c).tolist(),
        "class": list(classes) * n, "score": scores.reshape(-1).astype(np.float32), "label": label,
        "prompt": [kind] * (n * c), "split": [split] * (n * c),
    }, schema=SCORE_SCHEMA)


def _case_study(path, model, store, truth, rows, seen, explanations, params, ep) -> None:
    """The paper's Fig. 5: a few test images with one finding each, and how similar each is to
    its class under the three prompt kinds."""
    cols = [truth.column(c) for c in seen]
    picked, classes_seen = [], set()
    for r in rows:
        present = [seen[j] for j, col in enumerate(cols) if truth.labels[r, col]]
        if len(present) == 1 and present[0] not in classes_seen:
            picked.append((r, present[0]))
            classes_seen.add(present[0])
        if len(picked) >= ep.case_study_images:
            break
    if not picked:  # the output still exists (DVC expects it) and says why it is empty
        plots.case_study(path, [], [], [], note=f"no {ep.split} image with exactly one finding to show")
        return
    img = image_embeddings(model, store.array, np.array([r for r, _ in picked]), ep.batch_size,
                           next(model.parameters()).device)
    bars = []
    for i, (_, c) in enumerate(picked):
        values = {}
        for kind in PROMPT_KINDS:
            t = text_embeddings(model, class_prompts([c], kind, explanations, params.explain))
            values[kind] = float(img[i] @ t[0])
        bars.append(values)
    plots.case_study(path, [store.array[r] for r, _ in picked], [c for _, c in picked], bars)
