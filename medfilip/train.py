"""The MedFILIP training loop: read it top to bottom in :func:`fit`.

One entry point for one CPU process, one GPU and ``torchrun --nproc_per_node N`` (DDP).
Per step: the batch's labels are gathered from every rank, the global batch's unique
label texts are split across the ranks so each text runs through the text tower once,
image and text features are gathered (open_clip style), the targets are built from the
precomputed label vectors (no language model runs), and the ITM loss of the whole global
batch is optimised. A checkpoint is written atomically after every epoch; a re-run with
the same inputs and params resumes from it and ends with the same weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medfilip.config import TrainParams
from medfilip.distributed import World, all_gather_varlen, gather_features, init_world
from medfilip.errors import UserError
from medfilip.evaluate.metrics import roc_auc
from medfilip.loss import itm_loss, target_entropy
from medfilip.model import MAX_LOGIT_SCALE, MedFILIP, ModelConfig, save
from medfilip.ssm import Calibration, build_targets
from medfilip.trainset import EpochBatchSampler, PixelDataset, TokenTable, TrainingIndex, chunks, collate_batch

CHECKPOINT = "last.pt"
BEST_DIR = "best"
# Params that do not change the trained weights: they never start a fresh run.
_NOT_IN_RUN_KEY = {"workers", "checkpoints", "progress", "epochs"}


class TrainError(UserError, RuntimeError):
    """Training cannot start or go on: says why and what to do."""


@dataclass
class TrainData:
    """Everything the loop reads, built once before it starts."""

    index: TrainingIndex
    store: object  # medfilip.pixels.PixelStore
    embeddings: torch.Tensor  # (T, D) label vectors in the index's text order
    tokenizer: object
    val_classes: list[str]  # seen classes scored by the quick val zero-shot AUC
    val_prompts: list[str]  # one prompt per val class
    same_category_only: bool = False  # ssm.same_category_only (the released code's SSM)
    calibration: Optional[Calibration] = None  # ssm.calibration, resolved (None: raw cosines, the paper's form)


def model_config(tp: TrainParams) -> ModelConfig:
    return ModelConfig(image_encoder=tp.image_encoder, image_pretrained=tp.image_pretrained,
                       image_size=tp.image_size, text_encoder=tp.text_encoder, text_pretrained=tp.text_pretrained,
                       text_pooling=tp.text_pooling, text_max_length=tp.text_max_length, embed_dim=tp.embed_dim)


def select_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device is 'cuda' but torch sees no CUDA GPU here: set train.device to auto or cpu")
    return torch.device(device)


def run_key(tp: TrainParams, fingerprint: str, world_size: int) -> str:
    """Which checkpoint folder a run resumes from: same weights-relevant params and inputs only."""
    params = {k: v for k, v in dataclasses.asdict(tp).items() if k not in _NOT_IN_RUN_KEY}
    blob = json.dumps({"params": params, "inputs": fingerprint, "world": world_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_generator(*key) -> torch.Generator:
    """A CPU generator seeded from ``key`` alone, never from (nor advancing) the global RNGs.

    What draws from it gets the same numbers however much else drew from the global RNGs
    before it: in an uninterrupted process and in one that resumed from a checkpoint.
    """
    digest = hashlib.sha256(json.dumps(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def augment_rng(seed: int, rank: int, epoch: int, step: int) -> torch.Generator:
    """The augmentation parameters of one step on one rank: a function of (train.seed, rank, epoch, step)."""
    return derived_generator("augment", seed, rank, epoch, step)


def loader_rng(seed: int) -> torch.Generator:
    """The DataLoader's own generator (its workers' base seed): the loader never draws from the global RNG.

    Without it, creating the loader's iterator draws from the global torch RNG: once per epoch
    without workers, but once per process with persistent workers, i.e. at a different point in a
    resumed process than in an uninterrupted one.
    """
    return derived_generator("loader", seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def build_optimizer(model: MedFILIP, tp: TrainParams) -> torch.optim.Optimizer:
    """SGD with momentum; the pretrained text tower at ``text_lr_mult``; the two projections (new,
    randomly initialised layers on either side) at the base lr; no weight decay on the logit scale."""
    text = [p for n, p in model.named_parameters() if n.startswith("text_tower.")]
    fresh = [p for n, p in model.named_parameters() if n.startswith(("image_tower.", "image_proj.", "text_proj."))]
    groups = [
        {"params": fresh, "lr": tp.lr},
        {"params": text, "lr": tp.lr * tp.text_lr_mult},
        {"params": [model.logit_scale], "lr": tp.lr, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=tp.lr, momentum=tp.momentum, weight_decay=tp.weight_decay)


def restart_periods(total_steps: int, first: int, mult: int) -> list[tuple[int, int]]:
    """(start, length) of each cosine period: ``first`` steps, then x ``mult`` each; the last
    period is cut or stretched to end on the last step, so a run always ends at ``min_lr``."""
    if total_steps < 1 or first < 1 or mult < 1:
        raise ValueError(f"need total_steps, first and mult >= 1, got {total_steps}, {first}, {mult}")
    periods, start, length = [], 0, first
    while start < total_steps:
        rest = total_steps - start
        if length >= rest or rest - length <= length * mult / 2:
            length = rest  # the last period: cut to, or stretched over, what remains
        periods.append((start, length))
        start, length = start + length, length * mult
    return periods


def restart_lr_factor(step: int, periods: list[tuple[int, int]], min_ratio: float) -> float:
    """SGDR (cosine annealing with warm restarts): the lr of ``step`` (0-based) over the base lr;
    each period runs from 1 down to ``min_ratio`` *on* its last step."""
    for start, length in periods:
        if step < start + length:
            t = (step - start) / max(1, length - 1)
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    return min_ratio


def build_scheduler(optimizer: torch.optim.Optimizer, tp: TrainParams, steps_per_epoch: int):
    """The lr schedule of ``tp`` as a LambdaLR (its state is just the step count: resumable)."""
    periods = restart_periods(tp.epochs * steps_per_epoch, tp.restart_epochs * steps_per_epoch, tp.restart_mult)
    ratio = tp.min_lr / tp.lr if tp.lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: restart_lr_factor(step, periods, ratio))


def augment(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Light on-device augmentation: scale 0.9-1.1, shift up to 5 %, brightness/contrast +-10 %.

    No flips: left and right are part of the labels ("left pleural effusion"). The few random
    parameters are drawn on the CPU from ``generator`` (:func:`augment_rng` in training; None: the
    global CPU RNG) and then moved to the device, so CPU and CUDA runs augment alike.
    """
    b = x.shape[0]
    draws = [torch.empty(shape).uniform_(low, high, generator=generator).to(x.device) for shape, low, high in
             (((b,), 0.9, 1.1), ((b, 2), -0.05, 0.05), ((b, 1, 1, 1), 0.9, 1.1), ((b, 1, 1, 1), -0.1, 0.1))]
    scale, shift, contrast, brightness = draws
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Padding with the image's own minimum, not 0 (0 is mid-grey after normalisation).
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    x = F.grid_sample(x - low, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + low
    return x * contrast + brightness


# --------------------------------------------------------------------------- one step


def global_batch(index: TrainingIndex, positions: torch.Tensor, world: World, device: torch.device):
    """The global batch's labels, identical on every rank.

    Returns (owner, text) of every label with owner = image index in the global batch
    (rank-major), and the same for the masked (uncertain, ``ignore``) texts.
    """
    b = len(positions)
    owner, text = index.labels_of(positions.numpy())
    iowner, itext = index.ignored_of(positions.numpy())
    local = torch.from_numpy(np.stack([owner + world.rank * b, text])).T.contiguous().to(device)
    ilocal = torch.from_numpy(np.stack([iowner + world.rank * b, itext])).T.contiguous().to(device)
    labels = torch.cat(all_gather_varlen(local, world))
    ignored = torch.cat(all_gather_varlen(ilocal, world))
    return labels[:, 0], labels[:, 1], ignored[:, 0], ignored[:, 1]


def batch_logits_and_targets(ddp_model, images: torch.Tensor, positions: torch.Tensor, data: TrainData,
                             tokens: TokenTable, tp: TrainParams, world: World, device: torch.device,
                             text_pooled: Optional[torch.Tensor] = None):
    """Forward one global batch: (logits (B, U), targets (B, U), mask (B, U), scale, local text feats)."""
    owner, text, iowner, itext = global_batch(data.index, positions, world, device)
    unique, label_unique = torch.unique(text, sorted=True, return_inverse=True)
    n_unique = len(unique)
    # Each unique text goes through the text tower once: rank r encodes the r-th contiguous share.
    share = max(1, math.ceil(n_unique / world.size))
    mine = unique[min(world.rank * share, n_unique - 1): min((world.rank + 1) * share, n_unique)]
    if len(mine) == 0:  # fewer texts than ranks: encode one (its features are dropped below)
        mine = unique[-1:]
    if text_pooled is not None:  # frozen text tower: its outputs were computed once
        img_local, txt_local, scale = ddp_model(images, text_pooled=text_pooled.index_select(0, mine))
    else:
        ids, mask = tokens.batch(mine)
        img_local, txt_local, scale = ddp_model(images, ids.to(device, non_blocking=True),
                                                mask.to(device, non_blocking=True))
    img = gather_features(img_local, world)
    own_count = max(0, min((world.rank + 1) * share, n_unique) - world.rank * share)
    txt = gather_features(txt_local[:own_count], world)[:n_unique]

    n_images = img.shape[0]
    table = data.embeddings
    targets = build_targets(
        tp.targets, table.index_select(0, unique), owner, label_unique, n_images,
        unique_category=torch.as_tensor(data.index.text_category, device=device).index_select(0, unique),
        same_category_only=data.same_category_only and tp.targets == "ssm",
        calibration=data.calibration if tp.targets == "ssm" else None,
    )
    weights = torch.ones_like(targets)
    if len(iowner):
        col = torch.searchsorted(unique, itext)
        present = (col < n_unique) & (unique[col.clamp_max(n_unique - 1)] == itext)
        weights[iowner[present], col[present]] = 0.0
    logits = scale * img.float() @ txt.float().T
    # Keeps every text-tower parameter in this rank's graph even when its share was dropped.
    logits = logits + 0.0 * txt_local.float().sum()
    return logits, targets, weights, scale


@torch.no_grad()
def pooled_text_table(model: MedFILIP, tokens: TokenTable, device: torch.device, chunk: int = 256) -> torch.Tensor:
    """The (frozen) text tower's pooled output for every label text, (T, hidden), once per run."""
    was_training = model.text_tower.training
    model.text_tower.eval()
    out = []
    for start in range(0, len(tokens.lengths), chunk):
        ids, mask = tokens.batch(torch.arange(start, min(start + chunk, len(tokens.lengths))))
        out.append(model.pool_text(ids.to(device), mask.to(device)).float())
    model.text_tower.train(was_training)
    return torch.cat(out)


def use_bf16(tp: TrainParams, device: torch.device) -> bool:
    """bf16 autocast: on CUDA unless precision is fp32; on CPU only when asked for."""
    return tp.precision == "bf16" or (tp.precision == "auto" and device.type == "cuda")


def train_step(model: MedFILIP, ddp_model, optimizer, scheduler, pixels: torch.Tensor, positions: torch.Tensor,
               data: TrainData, tokens: TokenTable, tp: TrainParams, world: World, device: torch.device,
               text_pooled: Optional[torch.Tensor] = None, *,
               augment_generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
    """One optimiser step on one (global) batch: augment on device, forward, ITM loss, backward, clip, step.

    ``augment_generator``: where the augmentation draws from (:func:`augment_rng`; None: the global RNG).
    """
    cuda = device.type == "cuda"
    images = model.prepare_images(pixels.to(device, non_blocking=True))
    if tp.augment:
        images = augment(images, augment_generator)
    if cuda and tp.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(tp, device)):
        logits, targets, weights, scale = batch_logits_and_targets(
            ddp_model, images, positions, data, tokens, tp, world, device, text_pooled)
    loss, parts = itm_loss(logits.float(), targets, mode=tp.loss, logit_scale=scale.float(), weights=weights)
    parts = {**parts, **target_entropy(targets, weights)}  # what the CE could learn (diagnostics)
    optimizer.zero_grad(set_to_none=True)
    (loss * world.size).backward()  # DDP averages: x world = the global loss's gradient
    if tp.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
    return loss.detach(), parts


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def val_zero_shot_auc(model: MedFILIP, data: TrainData, positions: np.ndarray, device: torch.device,
                      batch_size: int) -> tuple[float, dict]:
    """Mean AUC over the seen classes of the val images: cos(image, class prompt) as the score.

    The score of an image depends on that image alone (no batch statistics); the model is in
    eval mode. Classes with no positive or no negative among the val images are left out.
    """
    if not len(positions) or not data.val_classes:
        return float("nan"), {}
    was_training = model.training
    model.eval()
    prompt = model.embed_texts(data.val_prompts, data.tokenizer).to(device)
    scores = []
    for chunk in chunks(positions, batch_size):
        pixels = torch.from_numpy(np.stack([np.asarray(data.store.array[r]) for r in data.index.pixel_row[chunk]]))
        x = model.prepare_images(pixels.to(device))
        scores.append((model.encode_image(x).float() @ prompt.float().T).cpu())
    scores = torch.cat(scores).numpy()
    truth = val_truth(data, positions)
    aucs = roc_auc(scores, truth)
    model.train(was_training)
    per_class = {c: float(a) for c, a in zip(data.val_classes, aucs) if not np.isnan(a)}
    return (float(np.mean(list(per_class.values()))) if per_class else float("nan")), per_class


def val_truth(data: TrainData, positions: np.ndarray) -> np.ndarray:
    """(N, C) bool: image n has a (non-negated) label of val class c."""
    index = data.index
    owner, text = index.labels_of(positions)
    class_of = {c: i for i, c in enumerate(data.val_classes)}
    lookup = np.array([class_of.get(c, -1) for c in index.categories] + [-1], dtype=np.int64)
    cls = lookup[index.text_category[text]]  # -1 (no category) indexes the trailing -1
    keep = cls >= 0
    truth = np.zeros((len(positions), len(data.val_classes)), dtype=bool)
    truth[owner[keep], cls[keep]] = True
    return truth


# --------------------------------------------------------------------------- the loop


def fit(tp: TrainParams, data: TrainData, model_dir: Path, fingerprint: str, *,
        log_epoch: Optional[Callable[[dict], None]] = None, stop_after_epochs: Optional[int] = None) -> dict:
    """Train, resuming from the run's checkpoint if one exists; write the best (val) model to ``model_dir``.

    ``log_epoch`` receives each epoch's metrics (dvclive in the stage). ``stop_after_epochs``
    ends the run early after that many epochs, as an interruption would (tests).
    """
    device = select_device(tp.device)
    world = init_world(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run_dir = Path(tp.checkpoints) / run_key(tp, fingerprint, world.size)
    run_dir.mkdir(parents=True, exist_ok=True)

    index = data.index
    train_pos, val_pos = index.positions("train"), index.positions("val")
    sampler = EpochBatchSampler(train_pos, tp.batch_size, tp.seed, rank=world.rank, world=world.size)
    if len(sampler) == 0:
        raise TrainError(
            f"{len(train_pos)} training images are fewer than one global batch of {tp.batch_size * world.size} "
            "(train.batch_size x processes): lower train.batch_size or add data"
        )

    seed_everything(tp.seed)  # same initial weights on every rank
    model = MedFILIP(model_config(tp)).to(device)
    cuda = device.type == "cuda"
    if cuda and tp.channels_last:
        model.image_tower.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, tp)
    steps_per_epoch = len(sampler)
    scheduler = build_scheduler(optimizer, tp, steps_per_epoch)
    data.embeddings = data.embeddings.to(device)
    tokens = TokenTable(data.tokenizer, index.texts, tp.text_max_length)

    start_epoch, best, history, resumed_from = 0, {"auc": -math.inf, "epoch": -1}, [], None
    checkpoint = run_dir / CHECKPOINT
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
        resumed_from = start_epoch
        rng_file = run_dir / f"rng-{world.rank}.pt"
        set_rng_state(torch.load(rng_file, weights_only=False) if world.rank and rng_file.exists() else state["rng"])
        if world.is_main:
            print(f"train: resuming {run_dir} after epoch {start_epoch}")
        for row in history:
            if log_epoch:
                log_epoch(row)
    else:
        seed_everything(tp.seed + world.rank)  # dropout differs per rank (augmentation: augment_rng)

    text_pooled = None
    if tp.text_frozen:
        model.text_tower.requires_grad_(False)
        text_pooled = pooled_text_table(model, tokens, device)

    ddp_model = model
    if world.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if tp.compile and cuda:
        model.image_tower.compile()
    loader = torch.utils.data.DataLoader(
        PixelDataset(data.store, index), batch_sampler=sampler, collate_fn=collate_batch,
        num_workers=tp.workers, pin_memory=cuda, persistent_workers=tp.workers > 0,
        prefetch_factor=4 if tp.workers > 0 else None, generator=loader_rng(tp.seed))

    last_epoch = tp.epochs if stop_after_epochs is None else min(tp.epochs, start_epoch + stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        ddp_model.train()
        if tp.text_frozen:
            model.text_tower.eval()  # no dropout: the cached outputs are what it would compute
        sums, n_seen, t0 = {}, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tp.epochs}", disable=not (tp.progress and world.is_main),
                   unit="batch", leave=False)
        for step, (pixels, positions) in enumerate(bar):
            lr_used = optimizer.param_groups[0]["lr"]  # the lr of this step (the scheduler steps after it)
            loss, parts = train_step(model, ddp_model, optimizer, scheduler, pixels, positions, data, tokens, tp,
                                     world, device, text_pooled,
                                     augment_generator=augment_rng(tp.seed, world.rank, epoch, step))
            # Sums stay on the device: no host sync per step on a GPU.
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            n_seen += pixels.shape[0] * world.size
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}", img_s=f"{n_seen / (time.perf_counter() - t0):.0f}")
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0

        val_auc, _ = (val_zero_shot_auc(model, data, val_pos, device, tp.batch_size * 2)
                      if world.is_main else (float("nan"), {}))
        means = {k: float(v) / steps_per_epoch for k, v in sums.items()}
        if "ce" in means:  # how far the soft CE is above what exact targets would score
            means["ce_minus_floor"] = means["ce"] - means["ce_floor"]
        means["ce_headroom"] = means["ce_uniform"] - means["ce_floor"]
        row = {"epoch": epoch + 1, **means,
               "lr": lr_used, "val_auc": val_auc,
               "img_per_s": n_seen / seconds if seconds > 0 else float("nan"),
               "logit_scale": float(model.scale().detach()), "seconds": seconds}
        history.append(row)
        # With no val AUC so far (no val image, or no class with a positive and a negative among
        # them) there is nothing to choose by: the latest epoch stands in, and the summary says so.
        no_val_yet = best["auc"] == -math.inf
        improved = world.is_main and (val_auc > best["auc"] if not math.isnan(val_auc) else no_val_yet)
        if world.is_main:
            if improved:
                best = {"auc": val_auc if not math.isnan(val_auc) else -math.inf, "epoch": epoch + 1}
                save(model, run_dir / BEST_DIR, data.tokenizer)
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best": best,
                         "history": history, "rng": rng_state()}, checkpoint)
            print(f"train: epoch {epoch + 1}/{tp.epochs} loss {row['loss']:.4f} val_auc {val_auc:.4f} "
                  f"{row['img_per_s']:.0f} img/s")
            if log_epoch:
                log_epoch(row)
        else:
            atomic_save(rng_state(), run_dir / f"rng-{world.rank}.pt")
        if world.distributed:
            torch.distributed.barrier()

    finished = last_epoch == tp.epochs
    if finished and world.is_main:
        import shutil

        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(run_dir / BEST_DIR, model_dir)
    if world.distributed:
        torch.distributed.barrier()
    selection = "best val AUC" if best["auc"] > -math.inf else "last epoch (no val AUC could be computed)"
    if finished and world.is_main and best["auc"] == -math.inf:
        print("train: no epoch had a val AUC (the val split has no image, or no class with both a positive and "
              "a negative): the model is the last epoch's. Give data.split.val a share to select by val AUC.")
    return {"finished": finished, "run_dir": str(run_dir), "resumed_from_epoch": resumed_from,
            "best_epoch": best["epoch"], "best_val_auc": best["auc"] if best["auc"] > -math.inf else None,
            "model_selection": selection,
            "epochs": history, "world_size": world.size, "device": str(device),
            "steps_per_epoch": steps_per_epoch, "index": index.summary()}
