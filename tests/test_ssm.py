"""The batch semantic similarity matrix (eq. 4-5) against a plain-loop twin, and its properties."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from medfilip.embed import embeddings_table
from medfilip.ssm import (Calibration, build_similarity_matrix, build_targets, gather_label_vectors,
                          load_embedding_table)


def loop_similarity(vecs, owner, n_images, category=None):
    """Eq. 4-5 the obvious way: for each image i and label j, max over i's labels k of cos(e_k, e_j)."""
    vecs = [[float(x) for x in row] for row in vecs]
    owner = [int(o) for o in owner]

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        return dot / norm

    sim = [[0.0] * len(vecs) for _ in range(n_images)]
    for i in range(n_images):
        own = [k for k in range(len(vecs)) if owner[k] == i]
        for j in range(len(vecs)):
            scores = []
            for k in own:
                if category is not None and int(category[k]) != int(category[j]):
                    scores.append(0.0)
                else:
                    scores.append(cos(vecs[k], vecs[j]))
            best = max(scores) if scores else 0.0
            sim[i][j] = min(1.0, max(0.0, best))
    return torch.tensor(sim, dtype=torch.float32).reshape(n_images, len(vecs))


def random_batch(n_images, n_labels, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    vecs = torch.nn.functional.normalize(torch.randn(n_labels, dim, generator=gen), dim=-1)
    # Skewed owners: some images get many labels, some none.
    weights = torch.rand(n_images, generator=gen) ** 3 + 1e-3
    owner = torch.multinomial(weights, n_labels, replacement=True, generator=gen)
    return vecs, owner


CASES = [(1, 1, 3), (3, 5, 4), (6, 12, 8), (8, 30, 16), (5, 2, 5), (16, 40, 32)]


@pytest.mark.parametrize("n_images,n_labels,dim", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_twin(n_images, n_labels, dim, seed):
    vecs, owner = random_batch(n_images, n_labels, dim, seed)
    fast = build_similarity_matrix(vecs, owner, n_images)
    torch.testing.assert_close(fast, loop_similarity(vecs, owner, n_images), atol=1e-5, rtol=0)


def test_loop_twin_cases_cover_empty_and_crowded_images():
    covered_empty = covered_many = False
    for n_images, n_labels, dim in CASES:
        for seed in (0, 1):
            _, owner = random_batch(n_images, n_labels, dim, seed)
            counts = torch.bincount(owner, minlength=n_images)
            covered_empty |= bool((counts == 0).any())
            covered_many |= bool((counts >= 5).any())
    assert covered_empty and covered_many


def test_image_without_labels_gets_zero_row():
    vecs, _ = random_batch(1, 4, 6, seed=3)
    owner = torch.tensor([0, 0, 2, 2])
    sim = build_similarity_matrix(vecs, owner, n_images=4)
    assert sim.shape == (4, 4)
    assert torch.all(sim[1] == 0) and torch.all(sim[3] == 0)


def test_properties_self_one_shape_and_range():
    vecs, owner = random_batch(7, 25, 12, seed=5)
    sim = build_similarity_matrix(vecs, owner, n_images=7)
    assert sim.shape == (7, 25) and sim.dtype == torch.float32
    assert torch.all(sim >= 0) and torch.all(sim <= 1)
    assert torch.all(sim[owner, torch.arange(25)] == 1.0)  # each label is fully similar to itself


def test_unnormalised_and_negative_similarities_are_cosine_and_clamped():
    vecs = torch.tensor([[1.0, 0.0], [-3.0, 0.0], [2.0, 2.0]])
    sim = build_similarity_matrix(vecs, torch.tensor([0, 1, 1]), n_images=2)
    expected = torch.tensor([[1.0, 0.0, math.sqrt(0.5)], [math.sqrt(0.5), 1.0, 1.0]])
    torch.testing.assert_close(sim, expected)


def test_images_sharing_a_label_text_are_fully_similar_at_each_others_labels():
    table = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    # image 0: texts 0, 1; image 1: texts 2, 1 (text 1 shared); image 2: text 3
    text_index = torch.tensor([0, 1, 2, 1, 3])
    owner = torch.tensor([0, 0, 1, 1, 2])
    sim = build_similarity_matrix(gather_label_vectors(table, text_index), owner, n_images=3)
    torch.testing.assert_close(sim[0, 3], torch.tensor(1.0))  # image 0 at image 1's copy of text 1
    torch.testing.assert_close(sim[1, 1], torch.tensor(1.0))  # image 1 at image 0's copy of text 1
    assert sim[2, 1] < 1.0


def test_same_category_only_zeroes_cross_category_pairs_and_matches_its_twin():
    vecs, owner = random_batch(6, 20, 8, seed=2)
    # Make the cross-category pairs clearly similar, so that zeroing them shows.
    vecs = torch.nn.functional.normalize(vecs + 2.0, dim=-1)
    category = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(9))
    plain = build_similarity_matrix(vecs, owner, 6)
    masked = build_similarity_matrix(vecs, owner, 6, label_category=category, same_category_only=True)
    torch.testing.assert_close(masked, loop_similarity(vecs, owner, 6, category), atol=1e-5, rtol=0)
    for i in range(6):
        own_categories = set(category[owner == i].tolist())
        if not own_categories:
            continue  # an image without labels is all zeros either way
        for j in range(20):
            if int(category[j]) not in own_categories:
                assert masked[i, j] == 0 and plain[i, j] > 0
    assert torch.all(masked <= plain + 1e-6)


def test_same_category_only_needs_label_category():
    vecs, owner = random_batch(2, 3, 4, seed=0)
    with pytest.raises(ValueError, match="label_category"):
        build_similarity_matrix(vecs, owner, 2, same_category_only=True)
    with pytest.raises(ValueError, match="label_category"):
        build_similarity_matrix(vecs, owner, 2, label_category=torch.tensor([0, 1]), same_category_only=True)


def test_bad_owner_and_shapes_are_clear_errors():
    vecs, _ = random_batch(2, 3, 4, seed=0)
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        build_similarity_matrix(vecs, torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="label_owner"):
        build_similarity_matrix(vecs, torch.tensor([0, 1]), 2)


def test_empty_batch_of_labels():
    sim = build_similarity_matrix(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 3)
    assert sim.shape == (3, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs_compute_in_float32(dtype):
    vecs, owner = random_batch(4, 10, 16, seed=4)
    sim = build_similarity_matrix(vecs.to(dtype), owner.int(), 4)
    assert sim.dtype == torch.float32
    reference = build_similarity_matrix(vecs.to(dtype).float(), owner, 4)
    torch.testing.assert_close(sim, reference)
    torch.testing.assert_close(sim, build_similarity_matrix(vecs, owner, 4), atol=1e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    vecs, owner = random_batch(8, 30, 16, seed=6)
    category = torch.randint(0, 4, (30,))
    for kwargs in ({}, {"label_category": category, "same_category_only": True}):
        cpu = build_similarity_matrix(vecs, owner, 8, **kwargs)
        cuda_kwargs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        gpu = build_similarity_matrix(vecs.cuda().half(), owner.cuda(), 8, **cuda_kwargs)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=0)


def test_gather_label_vectors():
    table = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    out = gather_label_vectors(table, torch.tensor([3, 0, 3]))
    torch.testing.assert_close(out, table[[3, 0, 3]])
    with pytest.raises(IndexError, match="re-run the embed stage"):
        gather_label_vectors(table, torch.tensor([4]))
    with pytest.raises(ValueError, match="1-D"):
        gather_label_vectors(table, torch.tensor([[0]]))


def test_load_embedding_table_round_trip(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    path = tmp_path / "embeddings.parquet"
    pq.write_table(embeddings_table(["a", "b", "c", "d"], vectors), path)
    table, rows = load_embedding_table(path)
    assert table.dtype == torch.float32 and table.shape == (4, 5)
    assert rows == {"a": 0, "b": 1, "c": 2, "d": 3}
    np.testing.assert_array_equal(table.numpy(), vectors)

    subset, rows = load_embedding_table(path, ["d", "b"])
    assert rows == {"d": 0, "b": 1}
    np.testing.assert_array_equal(subset.numpy(), vectors[[3, 1]])
    with pytest.raises(KeyError, match="zz"):
        load_embedding_table(path, ["a", "zz"])


def test_load_embedding_table_accepts_plain_lists_of_equal_length(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(
        pa.table({"text_id": ["x", "y"], "embedding": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))}),
        path,
    )
    table, _ = load_embedding_table(path)
    assert table.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(FileNotFoundError, match="embed"):
        load_embedding_table(tmp_path / "missing.parquet")


# --- build_targets: the (B, U) targets over a batch's unique label texts ---------------------------


def loop_targets(kind, unique_vecs, owner, unique, n_images, category=None, same_category_only=False,
                 calibration=None):
    """The three target kinds the obvious way, one (image, text) pair at a time. ``calibration``:
    (kind, value), rescale: (cos - floor) / (1 - floor) clamped to [0, 1]; sharpen: exp((cos - 1) / T)."""
    vecs = [[float(x) for x in row] for row in unique_vecs]
    owner = [int(o) for o in owner]
    unique = [int(u) for u in unique]
    category = None if category is None else [int(c) for c in category]

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    targets = [[0.0] * len(vecs) for _ in range(n_images)]
    for i in range(n_images):
        own_texts = [unique[k] for k in range(len(owner)) if owner[k] == i]
        for u in range(len(vecs)):
            if kind == "identity":
                targets[i][u] = 1.0 if u in own_texts else 0.0
            elif kind == "multihot":
                targets[i][u] = 1.0 if any(category[t] == category[u] for t in own_texts) else 0.0
            else:
                def pair(t):
                    c = 1.0 if t == u else cos(vecs[t], vecs[u])
                    if calibration is not None and calibration[0] == "rescale":
                        c = min(1.0, max(0.0, (c - calibration[1]) / (1.0 - calibration[1])))
                    elif calibration is not None:
                        c = math.exp((min(c, 1.0) - 1.0) / calibration[1])
                    return 0.0 if same_category_only and category[t] != category[u] else c

                scores = [pair(t) for t in own_texts]
                targets[i][u] = min(1.0, max(0.0, max(scores))) if scores else 0.0
    return torch.tensor(targets, dtype=torch.float32).reshape(n_images, len(vecs))


def random_unique_batch(n_images, n_unique, n_labels, dim, seed, n_categories=3):
    """Unique texts, each read by at least one label (n_labels >= n_unique), skewed owners, categories."""
    gen = torch.Generator().manual_seed(seed)
    # Shifted vectors: many positive cosines, so that clamping and masking both show.
    unique_vecs = torch.randn(n_unique, dim, generator=gen) + 0.5
    unique = torch.cat([torch.arange(n_unique), torch.randint(0, n_unique, (n_labels - n_unique,), generator=gen)])
    unique = unique[torch.randperm(n_labels, generator=gen)]
    weights = torch.rand(n_images, generator=gen) ** 3 + 1e-3
    owner = torch.multinomial(weights, n_labels, replacement=True, generator=gen)
    category = torch.randint(0, n_categories, (n_unique,), generator=gen)
    return unique_vecs, owner, unique, category


UNIQUE_CASES = [(1, 1, 1, 3), (3, 4, 6, 4), (6, 5, 15, 8), (8, 12, 30, 16), (5, 2, 9, 5)]


@pytest.mark.parametrize("n_images,n_unique,n_labels,dim", UNIQUE_CASES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "kind,same_category_only", [("ssm", False), ("ssm", True), ("multihot", False), ("identity", False)]
)
def test_build_targets_matches_loop_twin(kind, same_category_only, n_images, n_unique, n_labels, dim, seed):
    vecs, owner, unique, category = random_unique_batch(n_images, n_unique, n_labels, dim, seed)
    fast = build_targets(
        kind, vecs, owner, unique, n_images, unique_category=category, same_category_only=same_category_only
    )
    twin = loop_targets(kind, vecs, owner, unique, n_images, category, same_category_only)
    assert fast.dtype == torch.float32 and fast.shape == (n_images, n_unique)
    torch.testing.assert_close(fast, twin, atol=1e-5, rtol=0)


def test_unique_cases_cover_empty_images_shared_texts_and_cross_category_pairs():
    empty = shared = crowded = False
    for n_images, n_unique, n_labels, dim in UNIQUE_CASES:
        for seed in (0, 1):
            _, owner, unique, _ = random_unique_batch(n_images, n_unique, n_labels, dim, seed)
            empty |= bool((torch.bincount(owner, minlength=n_images) == 0).any())
            crowded |= bool((torch.bincount(owner, minlength=n_images) >= 4).any())
            # the same text owned by two different images
            shared |= any(len(set(owner[unique == u].tolist())) > 1 for u in range(n_unique))
    assert empty and shared and crowded


@pytest.mark.parametrize("same_category_only", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_ssm_with_merged_columns_equals_the_per_label_version_after_merging(same_category_only, seed):
    vecs, owner, unique, category = random_unique_batch(7, 9, 25, 12, seed)
    per_label = build_similarity_matrix(
        vecs[unique], owner, 7, label_category=category[unique], same_category_only=same_category_only
    )  # (B, M): one column per label, equal texts repeated
    first_label_of_text = torch.tensor([int(torch.nonzero(unique == u)[0]) for u in range(9)])
    merged = build_targets(
        "ssm", vecs, owner, unique, 7, unique_category=category, same_category_only=same_category_only
    )
    torch.testing.assert_close(merged, per_label[:, first_label_of_text], atol=1e-6, rtol=0)
    # Every column of one text in the per-label matrix is the same column.
    for u in range(9):
        for k in torch.nonzero(unique == u).flatten().tolist():
            torch.testing.assert_close(per_label[:, k], merged[:, u], atol=1e-6, rtol=0)


def test_build_targets_properties():
    vecs, owner, unique, category = random_unique_batch(6, 5, 15, 8, seed=3)
    ssm = build_targets("ssm", vecs, owner, unique, 6)
    identity = build_targets("identity", vecs, owner, unique, 6)
    multihot = build_targets("multihot", vecs, owner, unique, 6, unique_category=category)
    assert torch.all(ssm[owner, unique] == 1.0)  # an image is fully similar to its own texts
    assert torch.all(identity[owner, unique] == 1.0)
    assert int(identity.sum()) == len(set(zip(owner.tolist(), unique.tolist())))
    assert torch.all(identity <= multihot) and torch.all(identity <= ssm)
    assert set(multihot.unique().tolist()) <= {0.0, 1.0}
    assert set(range(6)) - set(owner.tolist())  # the case has an image without labels
    for i in set(range(6)) - set(owner.tolist()):
        assert torch.all(ssm[i] == 0) and torch.all(identity[i] == 0) and torch.all(multihot[i] == 0)


def test_build_targets_clear_errors():
    vecs, owner, unique, category = random_unique_batch(3, 4, 6, 4, seed=0)
    with pytest.raises(ValueError, match="ssm, multihot, identity"):
        build_targets("soft", vecs, owner, unique, 3)
    with pytest.raises(ValueError, match="unique_category"):
        build_targets("multihot", vecs, owner, unique, 3)
    with pytest.raises(ValueError, match="unique_category"):
        build_targets("ssm", vecs, owner, unique, 3, same_category_only=True)
    with pytest.raises(ValueError, match="unique_category"):
        build_targets("multihot", vecs, owner, unique, 3, unique_category=category[:2])
    with pytest.raises(ValueError, match="kind='ssm' only"):
        build_targets("identity", vecs, owner, unique, 3, unique_category=category, same_category_only=True)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        build_targets("ssm", vecs, owner, torch.tensor([0, 1, 2, 3, 4, 0]), 3)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        build_targets("ssm", vecs, torch.tensor([0, 1, 2, 3, 0, 0]), unique, 3)
    with pytest.raises(ValueError, match=r"\(L,\)"):
        build_targets("ssm", vecs, owner, unique[:3], 3)


def test_build_targets_without_labels_and_low_precision():
    no_labels = torch.zeros(0, dtype=torch.long)
    empty = build_targets("ssm", torch.zeros(0, 4), no_labels, no_labels, 3)
    assert empty.shape == (3, 0)
    vecs, owner, unique, _ = random_unique_batch(4, 6, 10, 16, seed=4)
    half = build_targets("ssm", vecs.bfloat16(), owner.int(), unique.int(), 4)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, build_targets("ssm", vecs, owner, unique, 4), atol=2e-2, rtol=0)


@pytest.mark.parametrize("n_images,n_unique,n_labels,dim", UNIQUE_CASES)
@pytest.mark.parametrize("calibration", [("rescale", 0.0), ("rescale", 0.5), ("rescale", 0.8), ("sharpen", 0.05),
                                         ("sharpen", 1.0)])
@pytest.mark.parametrize("same_category_only", [False, True])
def test_calibrated_targets_match_loop_twin(calibration, same_category_only, n_images, n_unique, n_labels, dim):
    vecs, owner, unique, category = random_unique_batch(n_images, n_unique, n_labels, dim, seed=3)
    fast = build_targets("ssm", vecs, owner, unique, n_images, unique_category=category,
                         same_category_only=same_category_only, calibration=Calibration(*calibration))
    twin = loop_targets("ssm", vecs, owner, unique, n_images, category, same_category_only, calibration=calibration)
    torch.testing.assert_close(fast, twin, atol=1e-5, rtol=0)


def test_a_calibration_only_applies_to_soft_targets():
    vecs, owner, unique, category = random_unique_batch(3, 4, 6, 4, seed=0)
    with pytest.raises(ValueError, match="calibration applies to kind='ssm' only"):
        build_targets("multihot", vecs, owner, unique, 3, unique_category=category,
                      calibration=Calibration("rescale", 0.5))
    with pytest.raises(ValueError, match="floor must lie"):
        Calibration("rescale", 1.0)
