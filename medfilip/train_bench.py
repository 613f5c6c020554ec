"""``medfilip bench train``: images/s and peak memory of (a) the image tower alone, (b) the full
training step on synthetic tensors, (c) the full step fed by the real loader.

(c)/(a) says how much of the image tower's speed the whole pipeline keeps (goal: >= 0.9).
Everything runs through the same functions as the train stage (:func:`medfilip.train.train_step`).
"""

from __future__ import annotations

import dataclasses
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from medfilip.config import TrainParams
from medfilip.model import MedFILIP, load_tokenizer
from medfilip.train import (TrainData, build_optimizer, model_config, pooled_text_table, select_device,
                            train_step, use_bf16)
from medfilip.trainset import EpochBatchSampler, PixelDataset, TokenTable, TrainingIndex, collate_batch
from medfilip.distributed import World


class _MemmapStore:
    """The PixelStore's read side over a synthetic (N, S, S) uint8 .npy (what PixelDataset uses)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.array = np.load(path, mmap_mode="r")

    def __reduce__(self):
        return (_MemmapStore, (self.path,))


def synthetic_data(n_images: int, store_size: int, n_texts: int, dim: int, tokenizer, folder: Path,
                   labels_per_image: int = 3, seed: int = 0) -> TrainData:
    """A training index with random labels over ``n_texts`` phrase-like texts, and a memmapped store."""
    rng = np.random.default_rng(seed)
    path = folder / "pixels.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n_images, store_size, store_size))
    for start in range(0, n_images, 1024):
        stop = min(n_images, start + 1024)
        array[start:stop] = rng.integers(0, 256, (stop - start, store_size, store_size), dtype=np.uint8)
    array.flush()
    counts = rng.integers(1, labels_per_image + 1, n_images)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    text = rng.integers(0, n_texts, int(offsets[-1])).astype(np.int64)
    n_categories = max(2, n_texts // 8)
    text_category = rng.integers(0, n_categories, n_texts).astype(np.int64)
    words = ["mild", "moderate", "severe", "left", "right", "lower", "upper", "lobe", "opacity", "effusion"]
    texts = [" ".join(rng.choice(words, 12)) + f" finding {i}" for i in range(n_texts)]
    index = TrainingIndex(
        image_id=np.array([f"img{i}" for i in range(n_images)], dtype=object),
        pixel_row=np.arange(n_images, dtype=np.int64), split=np.array(["train"] * n_images, dtype=object),
        offsets=offsets, text=text, category=text_category[text],
        ignore_offsets=np.zeros(n_images + 1, dtype=np.int64), ignore_text=np.zeros(0, dtype=np.int64),
        unseen=np.zeros(n_images, dtype=bool), categories=[f"c{i}" for i in range(n_categories)],
        text_ids=[f"t{i}" for i in range(n_texts)], texts=texts, text_category=text_category,
        text_negated=np.zeros(n_texts, dtype=bool))
    embeddings = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(n_texts, dim)).astype(np.float32)), dim=1)
    return TrainData(index=index, store=_MemmapStore(path), embeddings=embeddings, tokenizer=tokenizer,
                     val_classes=[], val_prompts=[])


def _peak_memory(device: torch.device) -> dict:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return out


def _timed(step, n_steps: int, batch: int, device: torch.device, warmup: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_steps * batch / (time.perf_counter() - t0)


def benchmark(tp: TrainParams, steps: int = 20, warmup: int = 3, n_texts: int = 2000) -> dict:
    """Run (a), (b), (c) with the train params ``tp`` (batch size, encoders, precision, compile)."""
    device = select_device(tp.device)
    torch.manual_seed(tp.seed)
    model = MedFILIP(model_config(tp)).to(device)
    cuda = device.type == "cuda"
    if cuda and tp.channels_last:
        model.image_tower.to(memory_format=torch.channels_last)
    if tp.compile and cuda:
        model.image_tower.compile()
    optimizer = build_optimizer(model, tp)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=1000)
    b, s = tp.batch_size, tp.image_size
    result = {"device": str(device), "batch_size": b, "image_size": s, "image_encoder": tp.image_encoder,
              "text_encoder": tp.text_encoder, "text_frozen": tp.text_frozen, "bf16": use_bf16(tp, device),
              "channels_last": tp.channels_last and cuda, "compile": tp.compile and cuda, "workers": tp.workers,
              "steps": steps}

    # (a) the image tower alone: forward, a scalar loss, backward, SGD step.
    x = torch.randn(b, 1, s, s, device=device)
    if cuda and tp.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def image_only():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(tp, device)):
            loss = model.encode_image(x).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    result["a_image_tower_img_s"] = round(_timed(image_only, steps, b, device, warmup), 1)
    result["a_memory"] = _peak_memory(device)

    tokenizer = load_tokenizer(model.cfg)
    n_images = b * (steps + warmup) * 2
    with tempfile.TemporaryDirectory(prefix="medfilip-train-bench-") as tmp:
        data = synthetic_data(n_images, s, n_texts, 384, tokenizer, Path(tmp))
        data.embeddings = data.embeddings.to(device)
        tokens = TokenTable(tokenizer, data.index.texts, tp.text_max_length)
        text_pooled = None
        if tp.text_frozen:
            model.text_tower.requires_grad_(False).eval()
            text_pooled = pooled_text_table(model, tokens, device)
        world = World()
        sampler = EpochBatchSampler(np.arange(n_images), b, tp.seed)

        # (b) the full step on tensors already in memory (pixels generated once, on the device).
        batches = list(sampler)[: steps + warmup]
        pixels = torch.from_numpy(np.array(data.store.array[: b])).to(device)
        it = iter(range(10**9))

        def full_synthetic():
            positions = torch.tensor(batches[next(it) % len(batches)])
            train_step(model, model, optimizer, scheduler, pixels, positions, data, tokens, tp, world, device,
                       text_pooled)

        result["b_full_step_synthetic_img_s"] = round(_timed(full_synthetic, steps, b, device, warmup), 1)
        result["b_memory"] = _peak_memory(device)

        # (c) the full step fed by the DataLoader over the memory-mapped store (workers, pinned memory).
        loader = torch.utils.data.DataLoader(
            PixelDataset(data.store, data.index), batch_sampler=sampler, collate_fn=collate_batch,
            num_workers=tp.workers, pin_memory=cuda, persistent_workers=False,
            prefetch_factor=4 if tp.workers > 0 else None)
        batches_iter = iter(loader)

        def full_loader():
            pixels, positions = next(batches_iter)
            train_step(model, model, optimizer, scheduler, pixels, positions, data, tokens, tp, world, device,
                       text_pooled)

        result["c_full_step_loader_img_s"] = round(_timed(full_loader, steps, b, device, warmup), 1)
        result["c_memory"] = _peak_memory(device)
        del batches_iter, loader
    result["c_over_a"] = round(result["c_full_step_loader_img_s"] / result["a_image_tower_img_s"], 3)
    return result


def bench_params(base: TrainParams, **overrides) -> TrainParams:
    """``base`` with the command line's overrides (None = keep)."""
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
