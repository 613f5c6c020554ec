"""Run under `torchrun --nproc_per_node 2` (gloo) in a pipeline project: the DDP global batch's
targets and logits must equal what one process builds from the same global batch.

Writes ddp_check_rank{R}.json with the largest differences; the test reads them.
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from medfilip.config import load_params
from medfilip.distributed import init_world
from medfilip.model import MedFILIP
from medfilip.train import World, batch_logits_and_targets, model_config, seed_everything
from medfilip.training_stage import load_train_data
from medfilip.trainset import EpochBatchSampler, TokenTable

if __name__ == "__main__":
    out = Path(sys.argv[1])
    params = load_params()
    tp = dataclasses.replace(params.train, device="cpu")
    world = init_world("cpu")
    data = load_train_data(params)
    seed_everything(tp.seed)
    model = MedFILIP(model_config(tp)).eval()  # eval: BatchNorm uses running stats on every rank
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    tokens = TokenTable(data.tokenizer, data.index.texts, tp.text_max_length)
    positions = data.index.positions("train")
    per_rank = EpochBatchSampler(positions, tp.batch_size, tp.seed, rank=world.rank, world=world.size)
    single = EpochBatchSampler(positions, tp.batch_size * world.size, tp.seed)
    mine, everything = next(iter(per_rank)), next(iter(single))

    def images_of(batch):
        pixels = torch.from_numpy(np.stack([data.store.array[r] for r in data.index.pixel_row[batch]]))
        return model.prepare_images(pixels)

    with torch.no_grad():
        logits, targets, weights, _ = batch_logits_and_targets(
            ddp, images_of(mine), torch.tensor(mine), data, tokens, tp, world, torch.device("cpu"))
        ref_logits, ref_targets, ref_weights, _ = batch_logits_and_targets(
            model, images_of(everything), torch.tensor(everything), data, tokens, tp, World(), torch.device("cpu"))
    result = {
        "world": world.size,
        "global_batch_equal": mine == everything[world.rank * tp.batch_size:(world.rank + 1) * tp.batch_size],
        "shape": list(logits.shape), "ref_shape": list(ref_logits.shape),
        "max_logit_diff": float((logits - ref_logits).abs().max()) if logits.shape == ref_logits.shape else None,
        "max_target_diff": float((targets - ref_targets).abs().max()) if targets.shape == ref_targets.shape else None,
        "weights_equal": bool(torch.equal(weights, ref_weights)) if weights.shape == ref_weights.shape else False,
    }
    (out / f"ddp_check_rank{world.rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()
