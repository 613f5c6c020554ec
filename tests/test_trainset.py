"""The training index against a plain-Python join, the CSR gather, the batch sampler and the token table."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch

from medfilip.embed import embeddings_table
from medfilip.explain import LABEL_SCHEMA, TEXT_SCHEMA
from medfilip.trainset import (
    SPLITS,
    EpochBatchSampler,
    TokenTable,
    _csr_gather,
    build_training_index,
)

REASONS = ("pixels_failed", "no_split", "no_label", "unseen_class_in_train_or_val")
POLICIES = ("positive", "negative", "ignore")
CATEGORIES = ["atelectasis", "effusion", "pneumothorax", "cardiomegaly", "edema"]

# --------------------------------------------------------------------------- synthetic tables


def write_embeddings(path, text_ids, seed=0, dim=6):
    vectors = np.random.default_rng(seed).normal(size=(len(text_ids), dim)).astype(np.float32)
    pq.write_table(embeddings_table(list(text_ids), vectors), path)
    return path


def label_row(study_id, text_id, category, negated=False, uncertain=False):
    return {"study_id": study_id, "text_id": text_id, "category_norm": category, "negated": negated,
            "uncertain": uncertain, "severity_norm": None, "location_norm": None}


def random_tables(seed, n_studies=30):
    """Images, studies, labels and texts with every awkward case, plus pixel_ok and the embedding order."""
    rng = random.Random(seed)
    texts = []  # (text_id, text, category, negated)
    for c, cat in enumerate(CATEGORIES):
        texts.append((f"t{c}a", f"mild {cat}", cat, False))
        texts.append((f"t{c}b", f"left {cat}", cat, False))
        texts.append((f"t{c}n", f"no {cat}", cat, True))
    texts.append(("tx", "support devices seen", None, False))  # a text without category (report mode)

    studies, images, labels = [], [], []
    for s in range(n_studies):
        sid = f"s{s}"
        split = rng.choice(list(SPLITS) + ["train", "train", None, "absent"])
        if split != "absent":  # "absent": the study has images but no row in studies.parquet
            studies.append({"study_id": sid, "split": split})
        for k in range(rng.choice([0, 1, 1, 2, 3])):  # 0: a study with labels but no image
            images.append({"image_id": f"{sid}_i{k}", "study_id": sid})
        for tid, _, cat, negated in rng.sample(texts, rng.choice([0, 1, 1, 2, 3, 4])):
            labels.append(label_row(sid, tid, cat, negated, uncertain=rng.random() < 0.3))
    images.append({"image_id": "orphan_i0", "study_id": "orphan"})  # a study nowhere else
    labels.append(label_row("ghost", "t0a", "atelectasis"))  # labels of a study without images
    rng.shuffle(images)

    pixel_ok = np.array([rng.random() > 0.15 for _ in images])
    text_table = pa.Table.from_pylist(
        [{"text_id": t, "text": x, "category_norm": c} for t, x, c, _ in texts], schema=TEXT_SCHEMA)
    embedding_order = [t for t, *_ in texts]
    rng.shuffle(embedding_order)  # the embedding table's order differs from texts.parquet's
    label_table = pa.Table.from_pylist(labels, schema=LABEL_SCHEMA)
    return (pa.Table.from_pylist(images), pa.Table.from_pylist(studies), label_table, text_table, pixel_ok,
            embedding_order)


def slow_index(images, studies, labels, texts, pixel_ok, uncertain, unseen_classes):
    """The index the obvious way: a loop over images, a dict join per image."""
    split_of = {r["study_id"]: r["split"] for r in studies.to_pylist()}
    by_study = defaultdict(list)
    negated = set()
    for r in labels.to_pylist():
        by_study[r["study_id"]].append((r["text_id"], bool(r["uncertain"])))
        if r["negated"]:
            negated.add(r["text_id"])
    category_of = {}
    for r in texts.to_pylist():
        cat = r["category_norm"]
        category_of[r["text_id"]] = None if cat is None else ("no " if r["text_id"] in negated else "") + cat

    rows, excluded = [], Counter()
    for pixel_row, image in enumerate(images.to_pylist()):
        split = split_of.get(image["study_id"])
        own = by_study.get(image["study_id"], [])
        kept = {t for t, unsure in own if not unsure or uncertain == "positive"}
        ignored = {t for t, unsure in own if unsure and uncertain == "ignore"}
        if not pixel_ok[pixel_row]:
            excluded["pixels_failed"] += 1
        elif split not in SPLITS:
            excluded["no_split"] += 1
        elif not kept:
            excluded["no_label"] += 1
        else:
            unseen = any(category_of[t] in unseen_classes for t in kept)
            if unseen and split != "test":
                excluded["unseen_class_in_train_or_val"] += 1
            rows.append({"image_id": image["image_id"], "pixel_row": pixel_row, "split": split,
                         "labels": kept, "ignored": ignored, "unseen": unseen})
    return rows, {reason: excluded[reason] for reason in REASONS}, category_of


def text_ids_at(index, offsets, values, n):
    return [index.text_ids[t] for t in values[offsets[n]:offsets[n + 1]]]


# --------------------------------------------------------------------------- the index against its twin


@pytest.mark.parametrize("uncertain", POLICIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("unseen_classes", [(), ("effusion", "no edema", "not a category")])
def test_index_matches_slow_join(tmp_path, uncertain, seed, unseen_classes):
    images, studies, labels, texts, pixel_ok, order = random_tables(seed)
    emb = write_embeddings(tmp_path / "embeddings.parquet", order, seed)
    index = build_training_index(images, studies, labels, texts, emb, pixel_ok,
                                 uncertain=uncertain, unseen_classes=unseen_classes)
    rows, excluded, category_of = slow_index(images, studies, labels, texts, pixel_ok, uncertain, unseen_classes)

    assert index.text_ids == order
    text_of = {r["text_id"]: r["text"] for r in texts.to_pylist()}
    assert index.texts == [text_of[t] for t in order]
    negated = set(pa.compute.filter(labels.column("text_id"), labels.column("negated")).to_pylist())
    assert index.text_negated.tolist() == [t in negated for t in order]
    assert index.categories == sorted({c for c in category_of.values() if c is not None})
    for i, t in enumerate(order):
        c = index.text_category[i]
        assert (index.categories[c] if c >= 0 else None) == category_of[t]

    assert len(index) == len(rows)
    assert list(index.image_id) == [r["image_id"] for r in rows]
    assert index.pixel_row.tolist() == [r["pixel_row"] for r in rows]
    assert list(index.split) == [r["split"] for r in rows]
    assert index.unseen.tolist() == [r["unseen"] for r in rows]
    assert index.excluded == excluded
    assert len(index.offsets) == len(index.ignore_offsets) == len(rows) + 1
    assert index.offsets.dtype == index.text.dtype == index.category.dtype == np.int64
    for n, row in enumerate(rows):
        own = text_ids_at(index, index.offsets, index.text, n)
        assert set(own) == row["labels"] and len(own) == len(set(own))
        assert set(text_ids_at(index, index.ignore_offsets, index.ignore_text, n)) == row["ignored"]
        cats = index.category[index.offsets[n]:index.offsets[n + 1]]
        assert [index.categories[c] if c >= 0 else None for c in cats] == [category_of[t] for t in own]
    if uncertain != "ignore":
        assert len(index.ignore_text) == 0

    for split in SPLITS:
        expected = [n for n, r in enumerate(rows) if r["split"] == split and not r["unseen"]]
        assert index.positions(split).tolist() == expected
        everyone = [n for n, r in enumerate(rows) if r["split"] == split]
        assert index.positions(split, include_unseen=True).tolist() == everyone
    summary = index.summary()
    assert summary["n_images"] == len(rows) and summary["excluded_by_reason"] == excluded


def test_random_cases_cover_every_branch():
    """The random tables above exercise each exclusion, shared studies, uncertain-only and unseen images."""
    seen = Counter()
    for seed in (0, 1, 2):
        images, studies, labels, texts, pixel_ok, _ = random_tables(seed)
        for policy in POLICIES:
            rows, excluded, _ = slow_index(images, studies, labels, texts, pixel_ok, policy, ("effusion",))
            seen.update({k: v for k, v in excluded.items() if v})
            seen["ignored"] += sum(bool(r["ignored"]) for r in rows)
        study_images = Counter(images.column("study_id").to_pylist())
        seen["shared_study"] += sum(n > 1 for n in study_images.values())
        seen["negated"] += sum(labels.column("negated").to_pylist())
    assert all(seen[k] > 0 for k in REASONS + ("ignored", "shared_study", "negated")), seen


# --------------------------------------------------------------------------- hand-made cases


@pytest.fixture
def small(tmp_path):
    """Five studies: s1 has two images, s2 only an uncertain label, s3 a negated one, s4 no split, s5 unseen."""
    images = pa.Table.from_pylist([
        {"image_id": "a", "study_id": "s1"}, {"image_id": "b", "study_id": "s1"},
        {"image_id": "c", "study_id": "s2"}, {"image_id": "d", "study_id": "s3"},
        {"image_id": "e", "study_id": "s4"}, {"image_id": "f", "study_id": "s5"},
        {"image_id": "g", "study_id": "s6"},  # no labels at all
    ])
    studies = pa.Table.from_pylist([{"study_id": s, "split": sp} for s, sp in
                                    [("s1", "train"), ("s2", "train"), ("s3", "val"), ("s5", "train"), ("s6", "test")]])
    labels = pa.Table.from_pylist([
        label_row("s1", "eff", "effusion"), label_row("s1", "ptx?", "pneumothorax", uncertain=True),
        label_row("s2", "ptx?", "pneumothorax", uncertain=True),
        label_row("s3", "no_ptx", "pneumothorax", negated=True), label_row("s3", "eff", "effusion"),
        label_row("s4", "eff", "effusion"),
        label_row("s5", "edema", "edema"),
    ], schema=LABEL_SCHEMA)
    texts = pa.Table.from_pylist([
        {"text_id": "eff", "text": "effusion", "category_norm": "effusion"},
        {"text_id": "ptx?", "text": "small pneumothorax", "category_norm": "pneumothorax"},
        {"text_id": "no_ptx", "text": "no pneumothorax", "category_norm": "pneumothorax"},
        {"text_id": "edema", "text": "edema", "category_norm": "edema"},
    ], schema=TEXT_SCHEMA)
    emb = write_embeddings(tmp_path / "embeddings.parquet", ["edema", "eff", "no_ptx", "ptx?"])
    return images, studies, labels, texts, emb, np.ones(images.num_rows, dtype=bool)


def labels_by_image(index):
    return {index.image_id[n]: sorted(text_ids_at(index, index.offsets, index.text, n)) for n in range(len(index))}


def test_uncertain_policies_on_hand_made_tables(small):
    by_policy = {p: build_training_index(*small, uncertain=p) for p in POLICIES}

    positive = by_policy["positive"]
    assert labels_by_image(positive) == {"a": ["eff", "ptx?"], "b": ["eff", "ptx?"], "c": ["ptx?"],
                                         "d": ["eff", "no_ptx"], "f": ["edema"]}
    assert positive.excluded == {"pixels_failed": 0, "no_split": 1, "no_label": 1, "unseen_class_in_train_or_val": 0}

    for policy in ("negative", "ignore"):
        index = by_policy[policy]
        # c's only label is uncertain: it has nothing left to train on.
        assert labels_by_image(index) == {"a": ["eff"], "b": ["eff"], "d": ["eff", "no_ptx"], "f": ["edema"]}
        assert index.excluded["no_label"] == 2
    ignore = by_policy["ignore"]
    owner, text = ignore.ignored_of(np.arange(len(ignore)))
    assert [(ignore.image_id[o], ignore.text_ids[t]) for o, t in zip(owner, text)] == [("a", "ptx?"), ("b", "ptx?")]
    assert len(by_policy["negative"].ignore_text) == 0


def test_negated_label_is_its_own_category(small):
    index = build_training_index(*small)
    assert index.categories == ["edema", "effusion", "no pneumothorax", "pneumothorax"]
    category = dict(zip(index.text_ids, (index.categories[c] for c in index.text_category)))
    assert category == {"edema": "edema", "eff": "effusion", "no_ptx": "no pneumothorax", "ptx?": "pneumothorax"}
    assert dict(zip(index.text_ids, index.text_negated.tolist())) == {
        "edema": False, "eff": False, "no_ptx": True, "ptx?": False}


def test_unseen_class_stays_out_of_training_positions(small):
    index = build_training_index(*small, unseen_classes=["edema"])
    f = list(index.image_id).index("f")
    assert index.unseen.tolist() == [n == f for n in range(len(index))]
    assert f not in index.positions("train")
    assert f in index.positions("train", include_unseen=True)
    assert index.excluded["unseen_class_in_train_or_val"] == 1
    # A negated finding is not the held-out finding itself.
    negated = build_training_index(*small, unseen_classes=["pneumothorax"])
    d = list(negated.image_id).index("d")
    assert not negated.unseen[d]


def test_failed_pixels_are_excluded_and_rows_keep_their_pixel_row(small):
    images, studies, labels, texts, emb, _ = small
    pixel_ok = np.array([True, False, True, True, True, True, True])  # image b failed
    index = build_training_index(images, studies, labels, texts, emb, pixel_ok)
    assert list(index.image_id) == ["a", "c", "d", "f"]
    assert index.pixel_row.tolist() == [0, 2, 3, 5]
    assert index.excluded["pixels_failed"] == 1


def test_text_id_without_embedding_is_a_key_error_naming_it(small, tmp_path):
    images, studies, labels, texts, _, pixel_ok = small
    emb = write_embeddings(tmp_path / "partial.parquet", ["edema", "eff", "no_ptx"])
    with pytest.raises(KeyError, match=r"ptx\?"):
        build_training_index(images, studies, labels, texts, emb, pixel_ok)


def test_embedding_without_a_text_row_is_a_key_error_naming_it(small, tmp_path):
    images, studies, labels, texts, _, pixel_ok = small
    emb = write_embeddings(tmp_path / "stale.parquet", ["edema", "eff", "no_ptx", "ptx?", "stale_text"])
    with pytest.raises(KeyError, match="stale_text"):
        build_training_index(images, studies, labels, texts, emb, pixel_ok)


def test_no_images_gives_an_empty_index(small):
    images, studies, labels, texts, emb, pixel_ok = small
    index = build_training_index(images.slice(0, 0), studies, labels, texts, emb, pixel_ok[:0])
    assert len(index) == 0 and index.offsets.tolist() == [0] and index.positions("train").tolist() == []
    assert index.excluded == dict.fromkeys(REASONS, 0)


def test_pixel_ok_of_the_wrong_length_is_a_value_error(small):
    images, studies, labels, texts, emb, pixel_ok = small
    with pytest.raises(ValueError, match="dvc repro pixels"):
        build_training_index(images, studies, labels, texts, emb, pixel_ok[:-1])


def test_embeddings_as_a_hand_built_fixed_size_list(small, tmp_path):
    images, studies, labels, texts, emb, pixel_ok = small
    ids = ["ptx?", "no_ptx", "eff", "edema"]
    vectors = pa.array(np.arange(16, dtype=np.float32))
    table = pa.table({"text_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(vectors, 4)})
    pq.write_table(table, tmp_path / "plain.parquet")
    index = build_training_index(images, studies, labels, texts, tmp_path / "plain.parquet", pixel_ok)
    assert index.text_ids == ids
    assert labels_by_image(index) == labels_by_image(build_training_index(*small))


# --------------------------------------------------------------------------- CSR gather


def test_csr_gather_matches_loop():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 4, size=40)
    lengths[[3, 7, 8]] = 0
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    values = rng.integers(0, 1000, size=offsets[-1]).astype(np.int64)
    for positions in (rng.integers(0, 40, size=25), np.array([7, 7, 3, 0, 39, 0]), np.arange(40)[::-1],
                      np.array([], dtype=np.int64), [8]):
        owner, got = _csr_gather(offsets, values, positions)
        want = [(k, int(values[j])) for k, p in enumerate(positions) for j in range(offsets[p], offsets[p + 1])]
        assert list(zip(owner.tolist(), got.tolist())) == want


def test_labels_of_arbitrary_positions_matches_loop(tmp_path):
    images, studies, labels, texts, pixel_ok, order = random_tables(4)
    index = build_training_index(images, studies, labels, texts, write_embeddings(tmp_path / "e.parquet", order),
                                 pixel_ok, uncertain="ignore")
    positions = np.random.default_rng(1).integers(0, len(index), size=3 * len(index))
    for gather, offsets, values in ((index.labels_of, index.offsets, index.text),
                                    (index.ignored_of, index.ignore_offsets, index.ignore_text)):
        owner, text = gather(positions)
        want = [(k, int(values[j])) for k, p in enumerate(positions) for j in range(offsets[p], offsets[p + 1])]
        assert list(zip(owner.tolist(), text.tolist())) == want


# --------------------------------------------------------------------------- the batch sampler


def batches(positions, batch_size, seed, epoch, rank=0, world=1, shuffle=True):
    sampler = EpochBatchSampler(positions, batch_size, seed, rank=rank, world=world, shuffle=shuffle)
    sampler.set_epoch(epoch)
    out = list(sampler)
    assert len(out) == len(sampler)
    return out


def test_sampler_is_deterministic_per_seed_and_epoch():
    positions = np.arange(100, 150)
    assert batches(positions, 4, seed=7, epoch=3) == batches(positions, 4, seed=7, epoch=3)
    assert batches(positions, 4, seed=7, epoch=3) != batches(positions, 4, seed=7, epoch=4)
    assert batches(positions, 4, seed=7, epoch=3) != batches(positions, 4, seed=8, epoch=3)
    for epoch in range(3):
        flat = [p for batch in batches(positions, 4, seed=7, epoch=epoch) for p in batch]
        assert len(flat) == len(set(flat)) == 48 and set(flat) <= set(positions.tolist())


@pytest.mark.parametrize("n", [16, 23, 31])
def test_ranks_together_see_the_single_process_batch(n):
    positions = np.arange(n) * 3
    single = batches(positions, 8, seed=1, epoch=2)
    ranks = [batches(positions, 4, seed=1, epoch=2, rank=r, world=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == n // 8
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == single  # rank-major within each global batch
    assert all(len(b) == 4 for r in ranks for b in r)


def test_sampler_drops_the_incomplete_last_global_batch_and_keeps_order_without_shuffle():
    positions = np.arange(10)
    assert batches(positions, 3, seed=0, epoch=0, shuffle=False) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert batches(positions, 2, seed=0, epoch=0, rank=1, world=3, shuffle=False) == [[2, 3]]
    assert batches(positions, 11, seed=0, epoch=0) == []


# --------------------------------------------------------------------------- the token table


@pytest.fixture(scope="module")
def tokenizer():
    from medfilip.model import ModelConfig, load_tokenizer

    return load_tokenizer(ModelConfig())


def test_token_table_batch_trims_padding_and_equals_the_tokenizer(tokenizer):
    texts = ["no pneumothorax", "a", "", "moderate bilateral pleural effusions with adjacent atelectasis " * 4,
             "small left apical pneumothorax"]
    max_length = 16
    table = TokenTable(tokenizer, texts, max_length, chunk=2)  # chunks of 2: the chunk seams are covered
    for index in ([0], [1, 0], [4, 2, 4], [3, 1], list(range(len(texts)))):
        ids, mask = table.batch(torch.tensor(index))
        want = [tokenizer(texts[i], truncation=True, max_length=max_length)["input_ids"] for i in index]
        assert ids.dtype == mask.dtype == torch.long
        assert ids.shape == mask.shape == (len(index), max(len(w) for w in want))
        for row, (w, m, expected) in enumerate(zip(ids, mask, want)):
            assert w[m.bool()].tolist() == expected, texts[index[row]]
            assert mask[row].tolist() == [1] * len(expected) + [0] * (ids.shape[1] - len(expected))
            assert w[~m.bool()].eq(tokenizer.pad_token_id).all()
    ids, mask = table.batch(torch.tensor([], dtype=torch.long))
    assert ids.shape[0] == mask.shape[0] == 0
