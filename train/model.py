"""DINOv2 meta-architecture on timm ViTs: backbone with mask token, DINO/iBOT heads, EMA teacher, losses.

Follows facebookresearch/dinov2 (train/ssl_meta_arch.py, layers/dino_head.py): the teacher sees the
global crops, the student all crops with iBOT masks on its global crops; DINO loss on cls tokens over
cross-view pairs, iBOT loss on masked patches, KoLeo on the student's global cls features.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import model_entrypoint
from torch.nn.utils.parametrizations import weight_norm
from torch.profiler import record_function

from dinotron import kernels
from dinotron.train.config import Config, HeadConfig, ModelConfig
from dinotron.train.masking import masked_patch_indices
from dinotron.train.parallel import full_tensor, local_tensors

log = logging.getLogger(__name__)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor `t` on `device` without a host sync: pinned, then copied non_blocking on the current stream (so
    the kernels queued after it read the data); the pinned copy lives until the transfer is done (torch's caching
    host allocator). On CPU, `t` itself."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def fp16_in_graph(autocast_dtype: torch.dtype | None) -> bool:
    """Whether a step under autocast `autocast_dtype` (None: no autocast) computes anything in fp16: everything under
    fp16, DINOHead's prototype layer under bf16. Such a step needs loss scaling (the trainer's GradScaler): the loss
    ops write the logits' gradient in the logits' dtype, and at dinov2's sizes its entries, about
    1 / (images x masked patches x student_temp x K) for iBOT, lie below fp16's smallest subnormal (6e-8)."""
    return autocast_dtype in (torch.float16, torch.bfloat16)


class DINOHead(nn.Module):
    """MLP (nlayers, GELU) -> L2-normalised bottleneck -> weight-normalised linear to K prototypes.

    x: (N, in_dim) -> (N, n_prototypes) logits in x's dtype.
    """

    def __init__(self, in_dim: int, cfg: HeadConfig):
        super().__init__()
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.nlayers - 1) + [cfg.bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(cfg.bottleneck_dim, cfg.n_prototypes, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)

    def forward(self, x: torch.Tensor, fused: bool = False):
        """Logits (N, K) in x's dtype; fused: (the L2-normalised bottleneck (N, D), the prototypes (K, D)), for the
        losses that apply the prototype layer themselves (kernels.fused_head_dino_loss / fused_head_ibot_loss). The
        prototypes are read here, inside forward, where FSDP2 has gathered them."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        device = x.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
            # The logits are cosines, divided by temperatures down to 0.04: bf16's 2^-8 steps near 1 would
            # become 0.1 in the softmax; fp16 has 8x finer ones (dinov2 runs its heads in fp16). fp16 in the graph
            # means loss scaling under bf16 too (fp16_in_graph, docs/training.md: Precision). The fused losses
            # multiply in the features' dtype: fp16 as well.
            if fused:
                return x.to(torch.float16), self.last_layer.weight
            with torch.autocast(device, dtype=torch.float16):
                return self.last_layer(x)
        if fused:
            return x, self.last_layer.weight
        return self.last_layer(x)


class HeadOutputs(NamedTuple):
    """MultiCropModel's forward. cls / patches are logits, or with fused heads the L2-normalised bottlenecks whose
    prototypes (K, D) come beside them (None otherwise)."""

    global_cls: torch.Tensor  # (n_global*B, C) backbone cls tokens of the global crops
    global_patches: torch.Tensor  # (n_global*B, N, C) their patch tokens
    cls: torch.Tensor  # DINO head of every crop's cls token (global then local)
    patches: torch.Tensor  # iBOT head of the M masked global patches, in masks' row-major order
    dino_prototypes: torch.Tensor | None = None
    ibot_prototypes: torch.Tensor | None = None


class BackboneOutput(NamedTuple):
    """A NamedTuple, so that FSDP2 finds its tensors (pytree) to hook the backward of a sharded backbone."""

    cls: torch.Tensor  # (B, C) normed cls token
    patches: torch.Tensor  # (B, N, C) normed patch tokens (registers excluded)


class SequenceDropPath(nn.Module):
    """Stochastic depth as timm's DropPath (one draw per sample of a (B, N, C) batch), and one draw
    per packed sequence while the owning Backbone runs packed crops as (1, T, C)."""

    def __init__(self, drop_prob: float, packing: "_Packing"):
        super().__init__()
        self.drop_prob = drop_prob
        self.packing = packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        seq = self.packing.token_seq
        if seq is None:
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        else:
            mask = x.new_empty(self.packing.n_seqs).bernoulli_(keep)[seq].view(1, -1, 1)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class _Packing:
    """Which packed sequence each token belongs to, while Backbone.forward_packed runs (`sequences`)."""

    token_seq: torch.Tensor | None = None  # (T,) int64 on the tokens' device
    n_seqs: int = 0

    @contextmanager
    def sequences(self, batches: list[tuple[int, int]], device: torch.device) -> Iterator[None]:
        """Tokens packed as batches of b sequences of n tokens each, (b, n) in order. token_seq is made on `device`
        from these host integers (no transfer, no data-dependent shape)."""
        self.n_seqs = sum(b for b, _ in batches)
        ids = torch.arange(self.n_seqs, device=device).split([b for b, _ in batches])
        self.token_seq = torch.cat([i[:, None].expand(-1, n).flatten() for i, (_, n) in zip(ids, batches, strict=True)])
        try:
            yield
        finally:
            self.token_seq, self.n_seqs = None, 0


def create_vit(cfg: ModelConfig, drop_path_rate: float) -> nn.Module:
    """A timm VisionTransformer, or a timm Eva (the DINOv3 and EVA-02 ViTs: rotary position embeddings, registers
    as prefix tokens), with dynamic image size (all crop sizes share weights), no classifier."""
    try:
        vit = timm.create_model(cfg.arch, pretrained=False, drop_path_rate=drop_path_rate, **timm_model_args(cfg))
    except RuntimeError as e:
        raise ValueError(f"model.arch: timm cannot create {cfg.arch!r}: {e}") from e
    missing = [a for a in ("patch_embed", "_pos_embed", "blocks", "norm", "num_prefix_tokens") if not hasattr(vit, a)]
    if missing or getattr(vit, "cls_token", None) is None:
        raise ValueError(f"model.arch: {cfg.arch!r} is not a timm VisionTransformer or Eva with a class token")
    if getattr(vit, "rope_mixed", False):
        raise ValueError(f"model.arch: {cfg.arch!r} has per-block rotary embeddings (rope_type='mixed'), which "
                         "Backbone does not run; use an arch with one rope for all blocks (DINOv3's, EVA-02's)")
    if cfg.layerscale is None and getattr(vit.blocks[0], "gamma_1", None) is not None:
        raise ValueError(f"model.layerscale=null: {cfg.arch!r} is a timm Eva with LayerScale by default, which "
                         "timm.create_model cannot turn off (it drops init_values=None); set model.layerscale")
    return vit


def pretrained_state(source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights model.pretrained names, and the timm config.json beside them ({} where there is none).

    source: a folder holding model.safetensors (or pytorch_model.bin / a single .pth) and config.json: `dinotron
    export` output or a timm local-dir (the "local-dir:" prefix is accepted); a .safetensors / .pth / .pt / .bin
    file; or a timm pretrained name ("vit_small_patch14_dinov2.lvd142m"), loaded by timm from its cache (downloaded
    where the network allows)."""
    path = Path(source.removeprefix("local-dir:")).expanduser()
    if path.is_dir():
        files = [path / n for n in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")]
        files = [f for f in files if f.is_file()] or sorted(path.glob("*.pth"))
        if not files:
            raise ValueError(f"model.pretrained: folder {path} holds no model.safetensors, pytorch_model.bin or .pth")
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        return _read_weights(files[0]), config
    if path.is_file():
        return _read_weights(path), {}
    if "/" in source or not timm.is_model(source.split(".")[0]):
        raise ValueError(f"model.pretrained: {source!r} is neither a file, a folder nor a timm model name")
    try:
        vit = timm.create_model(source, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001  (hub errors, missing cache without network: all mean "not available")
        raise ValueError(f"model.pretrained: timm could not load the weights of {source!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); without network, give a local file or folder") from e
    return vit.state_dict(), {"architecture": source.split(".")[0]}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"model.pretrained: {path} is not a .safetensors, .pth, .pt or .bin file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):  # common wrappers (dinov2's checkpoints keep the teacher)
        state = state.get(key, state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"model.pretrained: {path} holds no state dict")
    return state


def load_pretrained(backbone: Backbone, source: str, arch: str) -> None:
    """Load model.pretrained into `backbone` (timm ViT + mask token): timm's checkpoint filter converts known
    formats (dinov2's own keys too) and resamples the position embedding to the backbone's grid (crops of other
    sizes interpolate it at run time); the mask token comes from the checkpoint where it has one (dinov2's). A
    checkpoint of another architecture raises ValueError naming what differs."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state, config = pretrained_state(source)
    vit = backbone.vit
    heads = config.get("model_args", {}).get("num_heads")
    if heads is not None and heads != vit.blocks[0].attn.num_heads:
        raise ValueError(f"model.pretrained: {source} has {heads} attention heads, model.arch={arch} "
                         f"{vit.blocks[0].attn.num_heads}: set model.arch / model.timm_kwargs to its architecture "
                         f"({config.get('architecture')}, {config.get('model_args')})")
    mask_token = state.get("mask_token")
    state = {k: v for k, v in checkpoint_filter_fn(dict(state), vit).items() if not k.startswith(("head.", "fc_norm"))
             or k in vit.state_dict()}
    own = vit.state_dict()
    wrong = {k: f"{tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        found = f" (checkpoint architecture {config['architecture']})" if config.get("architecture") else ""
        raise ValueError(
            f"model.pretrained: {source}{found} does not match model.arch={arch}: "
            + "; ".join(f"{what}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}" for what, items in
                        (("shape (checkpoint vs model)", [f"{k} {s}" for k, s in wrong.items()]),
                         ("missing", missing), ("unexpected", unexpected)) if items))
    vit.load_state_dict(state)
    if mask_token is not None and mask_token.numel() == backbone.mask_token.numel():
        backbone.mask_token.data.copy_(mask_token.view_as(backbone.mask_token))


def timm_model_args(cfg: ModelConfig) -> dict:
    """The timm.create_model keyword arguments that build the backbone (without drop path).

    LayerScale off is init_values=0.0: timm.create_model drops None-valued arguments, which would
    leave an architecture's own default (1e-5 for the *_dinov2 ViTs) in place."""
    args = dict(num_classes=0, img_size=cfg.img_size, dynamic_img_size=True, init_values=cfg.layerscale or 0.0)
    eva = timm.is_model(cfg.arch) and model_entrypoint(cfg.arch).__module__ == "timm.models.eva"
    if eva:  # Eva: init_values=0.0 would be a LayerScale of 0; the final norm on the tokens (not fc_norm)
        args.update(init_values=cfg.layerscale, use_fc_norm=False)
    if cfg.num_registers:
        args["num_reg_tokens" if eva else "reg_tokens"] = cfg.num_registers
    args.update(cfg.timm_kwargs)
    return args


class Backbone(nn.Module):
    """A timm ViT (or Eva, whose blocks take its rotary embedding) plus dinov2's mask token, which replaces masked
    patch embeddings before the position embedding is added. `vit`'s state dict is plain timm.

    Stochastic depth: `uniform_drop_path` gives every block that rate (dinov2's drop_path_uniform),
    else timm's linear schedule is kept; either way per packed sequence in forward_packed."""

    def __init__(self, vit: nn.Module, uniform_drop_path: float | None = None):
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim))
        self._packing = _Packing()
        for block in vit.blocks:
            for name in ("drop_path1", "drop_path2"):
                timm_rate = getattr(block, name).drop_prob if isinstance(getattr(block, name), DropPath) else 0.0
                rate = timm_rate if uniform_drop_path is None else uniform_drop_path
                setattr(block, name, SequenceDropPath(rate, self._packing))

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    def tokens(self, images: torch.Tensor,
               masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (B, 3, S, S), masks (B, (S/p)^2) bool -> ((B, prefix + (S/p)^2, C) input tokens, the rotary
        embedding of the (S/p)^2 grid: ((S/p)^2, 2 head_dim) [sin | cos] for a timm Eva with rope, else None)."""
        x = self.vit.patch_embed(images)  # (B, h, w, C) with dynamic_img_size
        if masks is not None:
            x = torch.where(masks.view(*x.shape[:-1], 1), self.mask_token.to(x.dtype), x)
        x, rope = self.vit._pos_embed(x), None
        if isinstance(x, tuple):  # timm's Eva: (tokens, rope), its patch dropout applied
            x, rope = x
        else:
            x = self.vit.patch_drop(x)
        return self.vit.norm_pre(x), rope

    def _blocks(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        for block in self.vit.blocks:  # an Eva's blocks take the rope (a ModuleList, not a Sequential)
            x = block(x) if rope is None else block(x, rope=rope)
        return x

    def _split(self, x: torch.Tensor) -> BackboneOutput:
        x = self.vit.norm(x)
        return BackboneOutput(cls=x[:, 0], patches=x[:, self.vit.num_prefix_tokens :])

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> BackboneOutput:
        return self._split(self._blocks(*self.tokens(images, masks)))

    def forward_packed(self, crops: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[BackboneOutput]:
        """Several crop batches (sizes may differ) through the blocks in one varlen pass; needs the
        dinotron attention swapped in (kernels.swap_timm_attention). A rope ViT's packed sequences each turn by
        their own grid's rope (kernels.flash_attention.pack_rope)."""
        tokens, ropes = zip(*[self.tokens(images, masks) for images, masks in crops], strict=True)
        batches = [tuple(t.shape[:2]) for t in tokens]
        cu_seqlens, max_seqlen = kernels.make_cu_seqlens([n for b, n in batches for _ in range(b)])
        packed = torch.cat([t.flatten(0, 1) for t in tokens])[None]
        rope = None if ropes[0] is None else \
            kernels.flash_attention.pack_rope(ropes, batches, self.vit.num_prefix_tokens)
        cu_seqlens = host_to_device(cu_seqlens, packed.device)
        with self._packing.sequences(batches, packed.device), kernels.packed_sequences(cu_seqlens, max_seqlen):
            packed = self._blocks(packed, rope)[0]
        outs, start = [], 0
        for t in tokens:
            n = t.shape[0] * t.shape[1]
            outs.append(self._split(packed[start : start + n].view(t.shape)))
            start += n
        return outs


class MultiCropModel(nn.ModuleDict):
    """A backbone with its heads ("backbone", "dino_head", optional "ibot_head"), run in one forward call
    so that DDP and FSDP2 (whose hooks sit on this module's call) see one forward per step."""

    def heads(self, cls_tokens: torch.Tensor, patch_tokens: torch.Tensor, fused: bool = False) -> tuple:
        """(DINO head of cls tokens, iBOT head of patch tokens, DINO prototypes, iBOT prototypes): logits and None,
        or fused the bottlenecks and the prototypes (DINOHead.forward). One head call when shared."""
        if "ibot_head" in self:
            dino, ibot = self.dino_head(cls_tokens, fused), self.ibot_head(patch_tokens, fused)
            return (dino[0], ibot[0], dino[1], ibot[1]) if fused else (dino, ibot, None, None)
        out = self.dino_head(torch.cat([cls_tokens, patch_tokens]), fused)
        rows, prototypes = (out[0], out[1]) if fused else (out, None)
        return rows[: cls_tokens.shape[0]], rows[cls_tokens.shape[0] :], prototypes, prototypes

    def forward(self, global_crops: torch.Tensor, masks: torch.Tensor, mask_indices: torch.Tensor,
                local_crops: torch.Tensor | None = None, *, mask_input: bool = True, pack: bool = False,
                fused: bool = False) -> HeadOutputs:
        """global_crops (n_global*B, 3, G, G), masks (n_global*B, (G/p)^2) bool, mask_indices (M,) int64 their
        masked_patch_indices, local_crops (n_local*B, 3, L, L) or None. The masked patch embeddings are replaced by
        the mask token when mask_input (the student). Returns HeadOutputs: logits, or with `fused` the heads'
        bottlenecks and prototypes. No host sync: the patches are picked by index_select, not by boolean indexing
        (nonzero)."""
        backbone = self.backbone
        input_masks = masks if mask_input else None
        with record_function("dinotron/backbone"):
            if pack and local_crops is not None:
                g, local = backbone.forward_packed([(global_crops, input_masks), (local_crops, None)])
            else:
                g = backbone(global_crops, input_masks)
                local = backbone(local_crops) if local_crops is not None else None
        with record_function("dinotron/heads"):
            cls_tokens = g.cls if local is None else torch.cat([g.cls, local.cls])
            heads = self.heads(cls_tokens, g.patches.flatten(0, 1).index_select(0, mask_indices), fused)
        return HeadOutputs(g.cls, g.patches, *heads)


def build_multicrop(cfg: Config, drop_path_rate: float) -> MultiCropModel:
    """cfg's backbone (random init) with its DINO head and, where separate, its iBOT head."""
    mc = cfg.model
    backbone = Backbone(create_vit(mc, drop_path_rate), drop_path_rate if mc.drop_path_uniform else None)
    parts = {"backbone": backbone, "dino_head": DINOHead(backbone.vit.embed_dim, cfg.dino.head)}
    if cfg.ibot.separate_head:
        parts["ibot_head"] = DINOHead(backbone.vit.embed_dim, cfg.ibot.head)
    return MultiCropModel(parts)


HEADS_FILE = "heads.safetensors"  # `dinotron export`: the heads, mask token and centres beside model.safetensors


def load_distillation_teacher(folder: str) -> tuple[MultiCropModel, dict[str, torch.Tensor]]:
    """A `dinotron export` folder as a frozen teacher: (the MultiCropModel of the config it was trained with, holding
    its backbone, heads and mask token; its {"dino_center", "ibot_center"}). ValueError where the folder has no
    heads."""
    from safetensors.torch import load_file

    from dinotron.train.config import from_dict

    path = Path(folder)
    config_file, heads_file = path / "config.json", path / HEADS_FILE
    if not (config_file.is_file() and heads_file.is_file()):
        raise ValueError(f"distillation.teacher: {path} is not a `dinotron export` folder with heads (config.json "
                         f"and {HEADS_FILE}); export the teacher run with `dinotron export --run RUN --out DIR`")
    teacher_cfg = from_dict(json.loads(config_file.read_text())["dinotron"]["config"])
    teacher = build_multicrop(teacher_cfg, 0.0)
    load_pretrained(teacher.backbone, str(path), teacher_cfg.model.arch)
    state = load_file(str(heads_file))
    teacher.load_state_dict({**teacher.state_dict(), **{k: v for k, v in state.items() if not k.endswith("_center")}})
    return teacher, {k: v for k, v in state.items() if k.endswith("_center")}


class DinoV2(nn.Module):
    """Student and EMA teacher (backbone, DINO head, iBOT head) with dinov2's objective.

    `centers` holds the teacher centring buffers (softmax centring); the teacher never gets gradients.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model
        widest = max(cfg.dino.head.bottleneck_dim, cfg.ibot.head.bottleneck_dim if cfg.ibot.separate_head else 0)
        if mc.fused_head and widest > kernels.fused_head.MAX_D:
            raise ValueError(f"model.fused_head takes head bottlenecks up to {kernels.fused_head.MAX_D} wide, got "
                             f"{widest}: set model.fused_head=false")
        self.student = build_multicrop(cfg, mc.drop_path_rate)
        if mc.pretrained:  # student and teacher start from it (the teacher is the student's copy)
            load_pretrained(self.student.backbone, mc.pretrained, mc.arch)
        self.register_buffer("dino_center", torch.zeros(1, cfg.dino.head.n_prototypes))
        self.register_buffer("ibot_center", torch.zeros(1, self.ibot_prototypes))
        if mc.pretrained and (Path(mc.pretrained.removeprefix("local-dir:")) / HEADS_FILE).is_file():
            self._load_exported_heads(Path(mc.pretrained.removeprefix("local-dir:")) / HEADS_FILE)
        if cfg.distillation.enabled:  # a frozen teacher of its own architecture, with its trained heads and centres
            self.teacher, centers = load_distillation_teacher(cfg.distillation.teacher)
            theirs = {k: tuple(v.shape) for k, v in centers.items()}
            ours = {"dino_center": tuple(self.dino_center.shape), "ibot_center": tuple(self.ibot_center.shape)}
            if theirs != ours:
                raise ValueError(f"distillation.teacher: its heads' centres are {theirs}, this student's {ours}: set "
                                 "dino.head.n_prototypes (and ibot.head) to the teacher's")
            if self.teacher.backbone.patch_size != self.student.backbone.patch_size:
                raise ValueError(f"distillation.teacher: patch size {self.teacher.backbone.patch_size}, this student "
                                 f"{self.student.backbone.patch_size}: the iBOT masks need the same patches in both")
            self.dino_center.copy_(centers["dino_center"])
            self.ibot_center.copy_(centers["ibot_center"])
        else:
            self.teacher = copy.deepcopy(self.student)
        for block in self.teacher.backbone.vit.blocks:  # the teacher runs without stochastic depth
            block.drop_path1 = nn.Identity()
            block.drop_path2 = nn.Identity()
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if cfg.gram.enabled:  # loaded from the EMA teacher by refresh_gram_teacher at the steps gram.* says
            self.gram_teacher = copy.deepcopy(self.teacher.backbone)
        self.gram_active = False  # set by the trainer from gram.it_load_ema_teacher
        if mc.attention == "dinotron":
            kernels.swap_timm_attention(self.student.backbone.vit)
            kernels.swap_timm_attention(self.teacher.backbone.vit)
        if mc.pack_crops and mc.attention != "dinotron":
            raise ValueError("model.pack_crops needs model.attention=dinotron (varlen attention)")

    def _load_exported_heads(self, path: Path) -> None:
        """A `dinotron export` folder continues with its heads and centres too (a later phase of the same run, e.g.
        high resolution), where they fit these heads; otherwise the heads start fresh, as from a plain timm
        checkpoint, and the log says why."""
        from safetensors.torch import load_file

        state = load_file(str(path))
        heads = {k: v for k, v in state.items() if k.split(".")[0] in ("dino_head", "ibot_head")}
        own = {**self.student.state_dict(), "dino_center": self.dino_center, "ibot_center": self.ibot_center}
        fits = set(heads) == {k for k in own if k.split(".")[0] in ("dino_head", "ibot_head")} and all(
            own[k].shape == v.shape for k, v in {**heads, "dino_center": state["dino_center"],
                                                  "ibot_center": state["ibot_center"]}.items())
        if not fits:
            log.info(f"model.pretrained: the heads in {path} do not fit model's heads; they start fresh")
            return
        self.student.load_state_dict({**self.student.state_dict(), **heads})
        self.dino_center.copy_(state["dino_center"])
        self.ibot_center.copy_(state["ibot_center"])
        log.info(f"model.pretrained: heads and centres from {path} too")

    @property
    def evaluated(self) -> MultiCropModel:
        """The model k-NN evaluates and `dinotron export` writes: the EMA teacher (dinov2), or the student when
        distilling (the teacher is someone else's model)."""
        return self.student if self.cfg.distillation.enabled else self.teacher

    @property
    def ibot_prototypes(self) -> int:
        return (self.cfg.ibot.head if self.cfg.ibot.separate_head else self.cfg.dino.head).n_prototypes

    @property
    def patch_size(self) -> int:
        return self.student.backbone.patch_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        if self.cfg.gram.enabled:
            self.gram_teacher.eval()
        return self

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """Gram teacher = the EMA teacher's backbone (dinov3's gram_load_ema_teacher / update_gram). Under FSDP2 the
        teacher's shards are gathered: a collective, so every rank calls it at the same step (the trainer does)."""
        for mine, teacher in zip(self.gram_teacher.parameters(), self.teacher.backbone.parameters(), strict=True):
            mine.copy_(full_tensor(teacher))

    @property
    def student_forward(self) -> nn.Module:
        """The student's forward: the student itself, or its DistributedDataParallel wrapper once set."""
        return self.__dict__.get("_student_forward", self.student)

    def wrap_student(self, wrapper: nn.Module) -> None:
        """Run the student through `wrapper` (DDP), kept out of the submodules: state dict keys stay student.*."""
        self.__dict__["_student_forward"] = wrapper

    @torch.no_grad()
    @record_function("dinotron/teacher")
    def teacher_targets(self, global_crops: torch.Tensor, masks: torch.Tensor, mask_indices: torch.Tensor,
                        teacher_temp: float) -> dict:
        """Teacher probabilities for the student's DINO (cls) and iBOT (masked patch) targets: {"cls_probs",
        "patch_probs"}; masks and mask_indices as in forward. Updates the softmax centres. With model.fused_head the
        targets are made inside the student's fused losses: {"cls_features", "patch_features", "dino_prototypes",
        "ibot_prototypes", "teacher_temp", "dino_center", "ibot_center"} (the teacher heads' bottlenecks and
        prototypes, the centres the targets use), and "cls_probs" for the collapse indicators only (its DINO targets,
        (n_global*B, K): the teacher side may hold them); the fused losses then set the centres.

        The centring ops run on every rank every step, with zero masked patches too: they all-reduce
        (centre sums, Sinkhorn's column sums), so a rank that skipped them would leave the others in a
        mismatched collective. A rank without masked patches contributes zeros; with none anywhere the
        iBOT centre stays as it was."""
        tc = self.cfg.teacher
        if self.cfg.model.fused_head:
            out = self.teacher(global_crops, masks, mask_indices, mask_input=False, fused=True)
            logits = F.linear(out.cls, out.dino_prototypes.to(out.cls.dtype))
            cls_probs = (kernels.softmax_center_teacher(logits, self.dino_center, teacher_temp) if
                         tc.centering == "softmax" else
                         kernels.sinkhorn_knopp_teacher(logits, teacher_temp, tc.sinkhorn_iterations))
            return {"cls_features": out.cls, "patch_features": out.patches, "dino_prototypes": out.dino_prototypes,
                    "ibot_prototypes": out.ibot_prototypes, "teacher_temp": teacher_temp, "cls_probs": cls_probs,
                    "dino_center": self.dino_center.clone(), "ibot_center": self.ibot_center.clone()}
        out = self.teacher(global_crops, masks, mask_indices, mask_input=False)
        cls_logits, patch_logits = out.cls, out.patches
        if tc.centering == "softmax":  # targets use the previous centre, then the centre takes this batch in
            cls_probs, center = kernels.softmax_center_and_update_teacher(
                cls_logits, self.dino_center, teacher_temp, tc.center_momentum, check_finite=False
            )
            self.dino_center.copy_(center)
            patch_probs, center = kernels.softmax_center_and_update_teacher(
                patch_logits, self.ibot_center, teacher_temp, tc.center_momentum, check_finite=False
            )
            self.ibot_center.copy_(center)
        else:
            cls_probs = kernels.sinkhorn_knopp_teacher(cls_logits, teacher_temp, tc.sinkhorn_iterations,
                                                       check_finite=False)
            patch_probs = kernels.sinkhorn_knopp_teacher(patch_logits, teacher_temp, tc.sinkhorn_iterations,
                                                         check_finite=False)
        return {"cls_probs": cls_probs, "patch_probs": patch_probs}

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor,
                teacher_temp: float, mask_indices: torch.Tensor | None = None) -> dict:
        """One training step's losses: teacher_targets, then student_losses.

        global_crops: (n_global*B, 3, G, G) view-major; local_crops: (n_local*B, 3, L, L) or None;
        masks: (n_global*B, (G/p)^2) bool iBOT masks; mask_indices: their masked_patch_indices, made on the host
        with the masks (the trainer does), or None to make them here (on a GPU a host sync). Returns
        {"loss", "dino_loss", "koleo_loss", "ibot_loss"} (fp32 scalars) and detached collapse indicators.
        """
        if mask_indices is None:
            mask_indices = masked_patch_indices(masks)
        targets = self.teacher_targets(global_crops, masks, mask_indices, teacher_temp)
        return self.student_losses(global_crops, local_crops, masks, mask_indices, targets)

    def student_losses(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor,
                       mask_indices: torch.Tensor, targets: dict) -> dict:
        """The student's side of forward against given teacher `targets` (teacher_targets' output): its forward
        of every crop, the heads, the DINO, KoLeo and iBOT losses and the collapse indicators; arguments and
        result as forward's. Nothing here reads the device back (no host sync, no shape that depends on the data),
        so torch.compile captures it as one graph (tests/test_compile.py).
        """
        cfg = self.cfg
        has_local = local_crops is not None and local_crops.shape[0] > 0
        out = self.student_forward(global_crops, masks, mask_indices, local_crops if has_local else None,
                                   pack=cfg.model.pack_crops, fused=cfg.model.fused_head)
        with record_function("dinotron/losses"):
            B = global_crops.shape[0] // cfg.data.augment.n_global
            dino, ibot = (self._fused_losses if cfg.model.fused_head else self._losses)(B, out, masks, targets)
            koleo = self._koleo(out.global_cls)
            total = cfg.dino.loss_weight * dino + cfg.dino.koleo_loss_weight * koleo + cfg.ibot.loss_weight * ibot
            losses = {"dino_loss": dino, "koleo_loss": koleo, "ibot_loss": ibot}
            if cfg.gram.enabled:  # 0 until the Gram teacher is loaded
                losses["gram_loss"] = self._gram(global_crops, out.global_patches) if self.gram_active else \
                    total.new_zeros(())
                total = total + cfg.gram.loss_weight * losses["gram_loss"]
        return {"loss": total, **losses, **collapse_indicators(targets["cls_probs"], out.global_cls)}

    def _gram(self, global_crops: torch.Tensor, student_patches: torch.Tensor) -> torch.Tensor:
        """dinov3's Gram loss of the student's global-crop patch features (from its forward, masked input as in
        dinov3) against the Gram teacher's on the same crops."""
        g = self.cfg.gram
        with torch.no_grad():
            teacher_patches = self.gram_teacher(global_crops).patches
        return kernels.gram_loss(student_patches, teacher_patches, normalize=g.normalized, remove_neg=g.remove_neg,
                                 remove_only_teacher_neg=g.remove_only_teacher_neg, img_level=g.img_level)

    def _losses(self, B: int, out: HeadOutputs, masks: torch.Tensor, targets: dict) -> tuple[torch.Tensor, ...]:
        """(DINO, iBOT) losses of the student's logits against the teacher's probabilities."""
        cfg = self.cfg
        student_views = out.cls.unflatten(0, (out.cls.shape[0] // B, -1))
        teacher_views = targets["cls_probs"].unflatten(0, (cfg.data.augment.n_global, -1))
        # lightly's pairing, the mean over the pairs of different crops: dinov2's two dino_loss calls and their scales
        dino = kernels.dino_loss(student_views, teacher_views, student_temp=cfg.dino.student_temp,
                                 ignore_diagonal=True, reduction="mean")
        # no masked patch: 0, with a zero gradient that still reaches the iBOT head (every rank's
        # parameters get a gradient, so the gradient all-reduce sees the same tensors on every rank)
        ibot = kernels.ibot_patch_loss(out.patches, targets["patch_probs"], masks, student_temp=cfg.dino.student_temp)
        return dino, ibot

    def _fused_losses(self, B: int, out: HeadOutputs, masks: torch.Tensor, targets: dict) -> tuple[torch.Tensor, ...]:
        """(DINO, iBOT) losses with the prototype layers fused in (no rows x K logits); sets the centres to the
        targets' centres updated with this batch (so a second call with the same targets gives the same)."""
        cfg, tc = self.cfg, self.cfg.teacher
        options = dict(teacher_temp=targets["teacher_temp"], student_temp=cfg.dino.student_temp,
                       center_momentum=tc.center_momentum, centering=tc.centering,
                       sinkhorn_iterations=tc.sinkhorn_iterations)
        dino, dino_center = kernels.fused_head_dino_loss(
            out.cls.unflatten(0, (out.cls.shape[0] // B, -1)),
            targets["cls_features"].unflatten(0, (cfg.data.augment.n_global, -1)), out.dino_prototypes,
            targets["dino_prototypes"], targets["dino_center"], ignore_diagonal=True, reduction="mean", **options)
        ibot, ibot_center = kernels.fused_head_ibot_loss(
            out.patches, targets["patch_features"], out.ibot_prototypes, targets["ibot_prototypes"], masks,
            center=targets["ibot_center"], **options)
        if tc.centering == "softmax":  # the targets used the previous centres; the centres take this batch in
            with torch.no_grad():
                self.dino_center.copy_(dino_center)
                self.ibot_center.copy_(ibot_center)
        return dino, ibot

    def _koleo(self, global_cls: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n_global = cfg.data.augment.n_global
        if cfg.dino.koleo_loss_weight > 0:  # as dinov2's do_koleo
            group = dist.group.WORLD if cfg.dino.koleo_all_ranks and dist.is_initialized() else None
            return sum(kernels.koleo_loss(c.float(), group=group, check_finite=False)
                       for c in global_cls.chunk(n_global))
        return global_cls.new_zeros((), dtype=torch.float32)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, over every parameter; under FSDP2 on each
        rank's own shards (teacher and student are sharded alike), so no communication. Distilling: nothing (the
        teacher stays frozen)."""
        if self.cfg.distillation.enabled:
            return
        t = local_tensors(self.teacher.parameters())
        s = local_tensors(self.student.parameters())
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)


@torch.no_grad()
def collapse_indicators(teacher_probs: torch.Tensor, student_cls: torch.Tensor) -> dict[str, torch.Tensor]:
    """teacher_entropy: mean entropy of the teacher targets / log K (1 = uniform collapse);
    prototypes_in_use: distinct argmax prototypes / min(K, rows) (tiny = one prototype dominates);
    feature_std: std over the batch of L2-normalised student cls features, mean over dims, times
    sqrt(D) (about 1 when spread, 0 when collapsed)."""
    p = teacher_probs.float()
    K = p.shape[1]
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1).mean() / math.log(K)
    # a flag per prototype, not bincount: bincount's output size depends on the data (a host sync on GPU)
    used = torch.zeros(K, dtype=torch.bool, device=p.device).index_fill_(0, p.argmax(dim=1), True)
    in_use = used.sum() / max(min(K, p.shape[0]), 1)
    f = F.normalize(student_cls.float(), dim=-1)
    std = f.std(dim=0).mean() * f.shape[1] ** 0.5 if f.shape[0] > 1 else f.new_zeros(())
    return {
        "teacher_entropy": entropy.detach(),
        "prototypes_in_use": in_use.float(),
        "feature_std": std.detach(),
    }
