"""The training configuration: one typed dataclass tree, YAML files and `key=value` overrides.

Defaults follow facebookresearch/dinov2's ssl_default_config.yaml (a ViT-S/14 here); a YAML file
sets any subset of keys and `dinotron train --config X.yaml a.b=c` overrides single keys. Unknown
keys and values of the wrong type raise ConfigError naming the key (with close matches).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dinotron.pipeline import MultiCropConfig
from dinotron.pipeline.multires import ResolutionPhase, check_schedule
from dinotron.pipeline.shards import MAX_IMAGE_PIXELS


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    arch: str = "vit_small_patch14_dinov2"  # any timm VisionTransformer name
    img_size: int = 224  # size the position embedding is built for; other crop sizes interpolate it
    drop_path_rate: float = 0.1
    drop_path_uniform: bool = True  # dinov2: the same rate in every block
    layerscale: float | None = 1.0e-5  # timm init_values; None disables LayerScale
    num_registers: int = 0  # register tokens (timm reg_tokens)
    attention: Literal["timm", "dinotron"] = "timm"  # "dinotron": our Triton attention inside timm
    pack_crops: bool = False  # run global and local crops through the blocks in one varlen pass
    compile: bool = False  # torch.compile the backbones
    # The heads' prototype layers fused into the DINO / iBOT losses (kernels.fused_head_*): no rows x K logits or
    # logit gradients on the student side; false: the heads' logits, then the loss kernels (same numbers).
    fused_head: bool = True
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    # Start student and teacher backbones from these weights (heads start fresh): a `dinotron export` folder or timm
    # local-dir, a .safetensors/.pth file, or a timm pretrained name (from timm's cache); None: random init.
    pretrained: str | None = None


@dataclass
class HeadConfig:
    n_prototypes: int = 65536
    bottleneck_dim: int = 256
    hidden_dim: int = 2048
    nlayers: int = 3


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    student_temp: float = 0.1
    koleo_loss_weight: float = 0.1
    # KoLeo's nearest neighbours among each rank's own batch (dinov2), or among every rank's (true)
    koleo_all_ranks: bool = False
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class IBOTConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    separate_head: bool = False
    head: HeadConfig = field(default_factory=HeadConfig)  # used when separate_head


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    centering: Literal["softmax", "sinkhorn_knopp"] = "softmax"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3


@dataclass
class OptimConfig:
    epochs: int = 100  # schedule epochs of train.epoch_length steps, as dinov2
    base_lr: float = 0.004  # for a total batch of 1024, scaled by scaling_rule
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = "sqrt_wrt_1024"
    min_lr: float = 1.0e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    clip_grad: float = 3.0  # per part (backbone, heads), as dinov2; 0 disables
    freeze_last_layer_epochs: int = 1
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class DataConfig:
    train_shards: list[str] = field(default_factory=list)  # brace patterns or paths
    batch_size_per_gpu: int = 64
    loader: Literal["dali", "torchvision"] = "dali"
    device: Literal["auto", "gpu", "cpu"] = "auto"  # where DALI decodes and augments
    num_threads: int = 8  # DALI CPU threads / torchvision workers
    augment: MultiCropConfig = field(default_factory=MultiCropConfig)
    # A sample whose image does not read (not an image, cut short, over max_image_pixels, undecodable): "skip"
    # replaces it by another sample drawn from (seed, epoch, sample), logged once with shard and key and counted per
    # shard; "raise" stops with ShardError naming them (check-shards always reports).
    on_error: Literal["skip", "raise"] = "skip"
    # Skipping stops (TooManyBadSamples) once more than this fraction of a rank's samples of one epoch were bad.
    max_bad_fraction: float = 0.01
    # Images over this many pixels are bad, checked from the header before decoding, in both loaders; the default
    # and the maximum are PIL's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS = 178,956,970).
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # "random": a global shuffle, each sample read from anywhere. "sequential" (network storage): every rank reads
    # whole shards, in an order drawn per epoch, and shuffles within windows of shuffle_buffer samples.
    read_order: Literal["random", "sequential"] = "random"
    shuffle_buffer: int = 10_000  # samples per shuffle window of read_order=sequential
    read_ahead: int = 2  # batches the background feeder reads beyond the loader's own prefetch
    read_threads: int = 2  # the background feeder's threads (sample reads, index parsing, header checks)
    # DINOv3's high-resolution adaptation: crop sizes by optimiser step, phases [{from_step, global_crops_size,
    # local_crops_size, global_local_crop_pairs_ratios}] (pipeline/multires.py); each step draws one (global, local)
    # pair of its phase from (seed, step), the same on every rank. Empty: augment's sizes throughout.
    resolution_schedule: list[ResolutionPhase] = field(default_factory=list)

    def __post_init__(self):
        check_schedule(self.resolution_schedule)
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not 1 <= self.max_image_pixels <= MAX_IMAGE_PIXELS:
            raise ValueError(f"max_image_pixels must be in [1, 178956970] (PIL refuses larger images), got "
                             f"{self.max_image_pixels}")
        for key in ("shuffle_buffer", "read_ahead", "read_threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class EvalConfig:
    knn_train_shards: list[str] = field(default_factory=list)  # memory bank (labelled)
    knn_val_shards: list[str] = field(default_factory=list)  # queries (labelled)
    period_steps: int = 12500  # k-NN during training every this many steps; 0: only at the end
    k: int = 20
    temperature: float = 0.07
    image_size: int = 224
    resize_size: int = 256
    batch_size: int = 256
    # Linear probe (`dinotron eval-linear`, dinov2's eval/linear.py) on the knn_*_shards' frozen features: one head per
    # (learning rate, cls or cls + patch mean). dinov2's grid, per 256 samples (scaled by linear_batch_size / 256).
    linear_learning_rates: list[float] = field(
        default_factory=lambda: [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1])
    linear_epochs: int = 10  # of linear_epoch_length iterations, as dinov2 (10 x 1250)
    linear_epoch_length: int = 1250
    linear_batch_size: int = 1024  # in all (one process trains on every rank's features): dinov2's 128 x 8 GPUs

    def __post_init__(self):
        lrs = self.linear_learning_rates
        if not lrs or not all(0 < lr < float("inf") for lr in lrs) or len(set(lrs)) != len(lrs):
            raise ValueError(f"linear_learning_rates must be distinct positive numbers, at least one, got {lrs}")
        for key in ("linear_epochs", "linear_epoch_length", "linear_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    # checkpoints, metrics.jsonl, config.yaml; one holding checkpoints needs --resume or --overwrite
    output_dir: str = "runs/dinotron"
    seed: int = 0  # iBOT masks are drawn from (seed, step, global image index): the same for any world size
    epoch_length: int = 1250  # dinov2's OFFICIAL_EPOCH_LENGTH
    max_steps: int | None = None  # stop early (schedules still span optim.epochs)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # GPU autocast dtype, loss-scaled unless fp32; CPU: fp32
    log_every: int = 1
    tensorboard: bool = False
    checkpoint_every: int = 1250
    keep_last: int = 3
    progress: bool = True
    collapse_patience: int = 50  # warn when the collapse indicators stay bad this many steps
    # How ranks share the work: "fsdp2" (fully_shard per block, sharded parameters, gradients and optimiser
    # state), "ddp" (DistributedDataParallel, bucketed all-reduce overlapped with backward), "none" (one
    # process); "auto": fsdp2 when WORLD_SIZE > 1, else none.
    parallel: Literal["auto", "fsdp2", "ddp", "none"] = "auto"
    grad_accum_steps: int = 1  # micro-batches of data.batch_size_per_gpu per optimiser step; no sync until the last
    # Recompute in backward: "full" every block, "selective" keeps matmul and attention outputs (as dinov3).
    activation_checkpointing: Literal["none", "full", "selective"] = "none"

    def __post_init__(self):
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclass
class GramConfig:
    """DINOv3's Gram anchoring (its ssl_default_config.yaml `gram:` block; names as there, `enabled` for its
    use_loss): the image-level Gram matrices of the student's L2-normalised patch features held to those of a Gram
    teacher, a snapshot of the EMA teacher's backbone loaded at step it_load_ema_teacher (the loss runs from then)
    and, with rep_update, reloaded before every step that is a multiple of update_frequency from it_first_update
    on, at most max_updates times. Departure: the Gram teacher sees the student's global crops (dinov3 gives it
    larger undistorted crops and resizes its patch features)."""

    enabled: bool = False
    loss_weight: float = 1.0
    it_load_ema_teacher: int = 0
    rep_update: bool = True
    update_frequency: int = 10000  # dinov3's ViT-7B Gram phase
    it_first_update: int = 0
    max_updates: int | None = None  # None: unlimited
    normalized: bool = True  # L2-normalise the patch features first (dinov3's apply_norm)
    img_level: bool = True  # a Gram matrix per image (dinov3's Gram phase); False: one over the batch's patches
    remove_neg: bool = False  # clip negative similarities of both (dinov3's remove_neg)
    remove_only_teacher_neg: bool = False  # clip the teacher's only

    def __post_init__(self):
        if self.update_frequency < 1 or self.it_load_ema_teacher < 0 or self.it_first_update < 0:
            raise ValueError("gram.update_frequency must be >= 1, gram.it_load_ema_teacher and gram.it_first_update "
                             f">= 0, got {self.update_frequency}, {self.it_load_ema_teacher}, {self.it_first_update}")
        if self.remove_neg and self.remove_only_teacher_neg:
            raise ValueError("gram.remove_neg and gram.remove_only_teacher_neg exclude each other (dinov3's GramLoss)")


@dataclass
class DistillationConfig:
    """Distillation (dinov2's ViT-g -> ViT-S/B/L): a frozen teacher of another architecture, whose own DINO / iBOT
    heads and centres give the targets; the student (model.*, its own heads of the same prototypes) learns DINO +
    iBOT + KoLeo from it; no EMA. k-NN and `dinotron export` then take the student."""

    enabled: bool = False
    teacher: str | None = None  # a `dinotron export` folder of the teacher run (backbone, heads, config)

    def __post_init__(self):
        if self.enabled and not self.teacher:
            raise ValueError("distillation.enabled needs distillation.teacher: a `dinotron export` folder")


@dataclass
class FSDPConfig:
    reduce_dtype: Literal["bf16", "fp32"] = "bf16"  # gradient reduce-scatter; parameters compute in train.precision
    reshard_after_forward: bool = True  # free gathered parameters after forward (False: keep them for backward)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IBOTConfig = field(default_factory=IBOTConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    gram: GramConfig = field(default_factory=GramConfig)

    def __post_init__(self):
        o = self.optim
        if o.warmup_epochs > o.epochs or o.freeze_last_layer_epochs > o.epochs:
            raise ValueError(
                f"optim.warmup_epochs ({o.warmup_epochs}) and optim.freeze_last_layer_epochs "
                f"({o.freeze_last_layer_epochs}) must not exceed optim.epochs ({o.epochs})"
            )


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples become lists), suitable for YAML/JSON."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_dict(data: dict, cls=Config, prefix: str = ""):
    """Build `cls` from a nested dict, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(_unknown_key(path, key, names, prefix))
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own validation (e.g. MultiCropConfig)
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def _unknown_key(path: str, key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = (f"; did you mean {', '.join(prefix + c for c in close)}?" if close
            else f"; valid keys here: {', '.join(names)}")
    return f"unknown config key '{path}'{hint}"


def _coerce(value, tp, path: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, prefix=path + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{path}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) and origin is list:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{path}' must have {len(args)} items, got {list(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config key '{path}' must be an integer, got {value!r}")
        return int(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{path}' has an unsupported type {tp}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings to a nested dict (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- key=value overrides, validated into a Config."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections")
    return from_dict(apply_overrides(data, overrides or []))
