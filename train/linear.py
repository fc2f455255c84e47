"""Linear-probe evaluation on frozen features (dinov2's eval/linear.py, features extracted once).

Features: the teacher backbone's final-norm cls token c (C), and, for the avgpool heads, [c | mean of the final-norm
patch tokens] (2C), in fp32 and not L2-normalised: dinov2's create_linear_input with use_n_blocks=1.
Heads: one linear layer z = W x + b (W ~ N(0, 0.01^2), b = 0) per (use_avgpool in {False, True}, lr in the grid),
all trained at once on the same batches: the loss is the sum over heads of each head's mean cross-entropy, so each
head's gradient is its own (a sweep equals training its heads one by one). SGD, momentum 0.9, no weight decay,
lr = grid value x batch / 256, cosine-annealed to 0 over epochs x epoch_length iterations (torch's
CosineAnnealingLR, stepped every iteration); batches are drawn without replacement from a permutation of the training
features redrawn each pass, a last partial batch dropped (dinov2's infinite sampler with drop_last). Scored on val:
top-1 / top-5 (micro-averaged, dinov2's MEAN_ACCURACY) of every head; the best head is the one of highest val top-1
(the first on ties), reported with its name, as dinov2 does (which also selects on the set it reports).

Reproduced from dinov2: the grid (`EvalConfig.linear_learning_rates` is dinov2's 13 values), the lr scaling, the
optimiser and schedule, the head init, the avgpool sweep, 10 x 1250 iterations, the head names
(classifier_1_blocks_avgpool_<bool>_lr_<lr>, lr to 5 significant digits here), best-on-val.
Simplified:
- one block only: dinov2 also sweeps use_n_blocks=4 (the last four blocks' cls tokens concatenated); the backbone
  returns its final block's tokens only.
- no augmentation: every image goes through the backbone once with the eval transform (resize, centre crop) and the
  heads train on those fixed features; dinov2 runs the backbone every iteration on RandomResizedCrop + flip views.
  One forward per image instead of one per iteration, and accuracies not directly comparable with dinov2's tables.
- every rank trains every head on every rank's features (gathered; same seed, so the same heads), where dinov2 splits
  the batches over ranks with DDP. No checkpoints of the heads, no evaluation during the probe, no test sets or class
  mappings.
- the heads of one feature set start from one N(0, 0.01^2) draw of a generator seeded by `seed` (dinov2 draws each
  head from the global RNG): a head trains the same in any sweep, and the probe leaves the global RNG alone.

Cost: the features live on the device of every rank, N x 2C fp32 (ImageNet-1k, ViT-S/14: 1.28M x 768 x 4 B = 3.9 GB;
ViT-L/14: 10.5 GB). An iteration runs one matmul per feature set over its heads, 4 B (C + 2C) H K flops forward and
backward (the features need no gradient) for H learning rates and K classes. Host syncs: the argument checks (label
range, finite features) and one read of the accuracies at the end; none per iteration (the permutations go to the
device pinned and non_blocking).
On CPU the heads train on one intra-op thread (_one_cpu_thread): their small matmuls lose to thread barriers.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinotron.train.config import Config
from dinotron.train.knn import extract_features
from dinotron.train.loop import _DTYPES, build_eval_loader
from dinotron.train.model import DinoV2, host_to_device
from dinotron.train.schedules import scaled_lr

log = logging.getLogger(__name__)


class LinearClassifiers(nn.Module):
    """dinov2's AllClassifiers: one nn.Linear(columns, num_classes) per (use_avgpool, learning rate), in
    `self.heads` by name, and `self.learning_rates[name]` its lr (as given: already scaled to the batch).

    cls_dim None: the features are cls tokens, one feature set (avgpool False, every column). cls_dim C: the features
    are [cls (C) | patch mean], the avgpool=False heads read the first C columns and the avgpool=True heads all.
    forward(features (B, D) fp32) -> (B, H, num_classes) logits of every head, in `self.heads` order: one matmul per
    feature set, its heads' weights concatenated."""

    def __init__(self, dim: int, num_classes: int, learning_rates: Sequence[float], cls_dim: int | None = None,
                 seed: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.heads = nn.ModuleDict()
        self.learning_rates: dict[str, float] = {}
        self.feature_sets: list[tuple[int, list[str]]] = []  # (columns read, names of the heads reading them)
        for avgpool, columns in ((False, cls_dim), (True, dim)) if cls_dim is not None else ((False, dim),):
            weight = torch.empty(num_classes, columns).normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
            names = []
            for lr in learning_rates:
                name = f"classifier_1_blocks_avgpool_{avgpool}_lr_{lr:.5g}".replace(".", "_")
                if name in self.heads:
                    raise ValueError(f"learning_rates: two of {list(learning_rates)} agree to 5 significant digits")
                head = nn.utils.skip_init(nn.Linear, columns, num_classes)  # skip_init: no draw from the global RNG
                with torch.no_grad():
                    head.weight.copy_(weight)
                    head.bias.zero_()
                self.heads[name], self.learning_rates[name] = head, lr
                names.append(name)
            self.feature_sets.append((columns, names))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = []
        for columns, names in self.feature_sets:
            heads = [self.heads[n] for n in names]
            weight, bias = torch.cat([h.weight for h in heads]), torch.cat([h.bias for h in heads])
            logits.append(F.linear(features[:, :columns], weight, bias).unflatten(1, (len(heads), self.num_classes)))
        return torch.cat(logits, dim=1)


def train_linear(features_train: torch.Tensor, labels_train: torch.Tensor, features_val: torch.Tensor,
                 labels_val: torch.Tensor, *, learning_rates: Sequence[float], epochs: int, epoch_length: int,
                 batch_size: int, cls_dim: int | None = None, seed: int = 0) -> tuple[dict, LinearClassifiers]:
    """Linear heads on frozen features, one per (feature set, learning rate), trained at once (module docstring).

    features_*: (N, D) / (M, D) floating, on one device; labels_*: (N,) / (M,) integer class ids >= 0 (the classes
    are 0 .. the largest id of either split). cls_dim: see LinearClassifiers. epochs x epoch_length iterations of
    batch = min(batch_size, N) samples; learning_rates: per 256 samples (dinov2's grid values), scaled by batch / 256.
    Deterministic given `seed` (and the device). On CPU, torch runs one intra-op thread meanwhile.

    Returns (results, the trained LinearClassifiers): results = {"top1": %, "top5": % (with >= 5 classes),
    "best_classifier": name, "classifiers": {name: {"top1": %, "top5": %}}}, the best by val top-1."""
    num_classes = _check_inputs(features_train, labels_train, features_val, labels_val, learning_rates, cls_dim,
                                epochs=epochs, epoch_length=epoch_length, batch_size=batch_size)
    device, batch = features_train.device, min(batch_size, features_train.shape[0])
    lrs = [scaled_lr(lr, batch, "linear_wrt_256") for lr in learning_rates]
    classifiers = LinearClassifiers(features_train.shape[1], num_classes, lrs, cls_dim, seed).to(device)
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": classifiers.learning_rates[name]}
         for name, head in classifiers.heads.items()], momentum=0.9, weight_decay=0.0)
    iterations = epochs * epoch_length
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations, eta_min=0.0)
    x, y = features_train.float(), labels_train.long()
    n_heads = len(classifiers.heads)
    with _one_cpu_thread(device):
        for idx in _batches(x.shape[0], batch, iterations, seed, device):
            logits = classifiers(x[idx])  # (B, H, K)
            per_sample = F.cross_entropy(logits.transpose(1, 2), y[idx, None].expand(-1, n_heads), reduction="none")
            loss = per_sample.mean(dim=0).sum()  # each head's mean cross-entropy, summed: dinov2's sum of losses
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        classifiers.eval()
        return _score(classifiers, features_val.float(), labels_val.long(), batch_size), classifiers


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On CPU, torch's intra-op threads set to 1 for the duration (restored after). The probe's matmuls (a batch of
    features times a few dozen heads) gain nothing from a second thread, and on a loaded 2-core machine its
    barriers made the demo's probe 10x slower (measured: 230 s vs 23.5 s for evaluate_linear, 8.5 s vs 0.24 s for a
    small train_linear)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _batches(n: int, batch: int, iterations: int, seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """`iterations` index batches of `batch` rows out of n: each pass over a fresh permutation (a CPU generator seeded
    by `seed`, so the same on any device), its last partial batch dropped."""
    generator = torch.Generator().manual_seed(seed)
    per_pass = n // batch
    for it in range(iterations):
        if it % per_pass == 0:
            order = host_to_device(torch.randperm(n, generator=generator), device)
        start = (it % per_pass) * batch
        yield order[start : start + batch]


@torch.no_grad()
def _score(classifiers: LinearClassifiers, features: torch.Tensor, labels: torch.Tensor, chunk: int) -> dict:
    """Top-1 / top-5 % of every head on (features, labels), read to the host once; the best head by top-1."""
    k = min(5, classifiers.num_classes)
    hits = torch.zeros(2, len(classifiers.heads), device=features.device)
    for start in range(0, features.shape[0], chunk):
        top = classifiers(features[start : start + chunk]).topk(k, dim=2).indices  # (b, H, k)
        match = top == labels[start : start + chunk, None, None]
        hits[0] += match[:, :, 0].sum(dim=0)
        hits[1] += match.any(dim=2).sum(dim=0)
    top1, top5 = (100.0 * hits / features.shape[0]).tolist()
    per_head = {}
    for name, a1, a5 in zip(classifiers.heads, top1, top5, strict=True):
        per_head[name] = {"top1": a1, **({"top5": a5} if classifiers.num_classes >= 5 else {})}
    best = max(per_head, key=lambda name: per_head[name]["top1"])  # the first of equals
    return {**per_head[best], "best_classifier": best, "classifiers": per_head}


def _check_inputs(features_train: torch.Tensor, labels_train: torch.Tensor, features_val: torch.Tensor,
                  labels_val: torch.Tensor, learning_rates: Sequence[float], cls_dim: int | None, **counts: int) -> int:
    """ValueError naming the argument for anything train_linear cannot use; returns the number of classes.
    Reads the labels' range and the features' finiteness on the host (two syncs)."""
    splits = {"train": (features_train, labels_train), "val": (features_val, labels_val)}
    for split, (feats, labels) in splits.items():
        if not (isinstance(feats, torch.Tensor) and feats.ndim == 2 and feats.is_floating_point()):
            raise ValueError(f"features_{split} must be a 2-D floating tensor (samples, features), got "
                             f"{getattr(feats, 'shape', type(feats).__name__)} {getattr(feats, 'dtype', '')}")
        if not (isinstance(labels, torch.Tensor) and labels.ndim == 1 and not labels.is_floating_point()
                and not labels.is_complex() and labels.dtype != torch.bool):
            raise ValueError(f"labels_{split} must be a 1-D integer tensor of class ids, got "
                             f"{getattr(labels, 'shape', type(labels).__name__)} {getattr(labels, 'dtype', '')}")
        if labels.shape[0] != feats.shape[0]:
            raise ValueError(f"labels_{split} has {labels.shape[0]} entries for {feats.shape[0]} rows of "
                             f"features_{split}: one label per sample")
        if feats.shape[0] == 0:
            raise ValueError(f"features_{split} is empty: the linear probe needs labelled {split} samples")
        if feats.device != features_train.device or labels.device != features_train.device:
            raise ValueError(f"features_{split} / labels_{split} are on {feats.device} / {labels.device}, "
                             f"features_train on {features_train.device}: put all four on one device")
    dim = features_train.shape[1]
    if features_val.shape[1] != dim:
        raise ValueError(f"features_val has {features_val.shape[1]} columns, features_train {dim}: extract both "
                         "with the same backbone and feature set")
    if cls_dim is not None and not 0 < cls_dim < dim:
        raise ValueError(f"cls_dim must be in [1, {dim - 1}] (the cls columns before the patch mean), got {cls_dim}")
    if not learning_rates or not all(0 < lr < float("inf") for lr in learning_rates) \
            or len(set(learning_rates)) != len(learning_rates):
        raise ValueError(f"learning_rates must be distinct positive numbers, at least one, got {list(learning_rates)}")
    for key, value in counts.items():
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    lowest = torch.stack([labels_train.min(), labels_val.min()]).min()
    finite = torch.isfinite(features_train).all() & torch.isfinite(features_val).all()
    if lowest < 0:
        raise ValueError(f"labels must be class ids >= 0, got {int(lowest)}")
    if not finite:
        raise ValueError("features_train / features_val hold NaN or inf: the backbone's features are not finite")
    return int(max(labels_train.max(), labels_val.max())) + 1


def evaluate_linear(model: DinoV2, cfg: Config, device: torch.device, rank: int = 0, world: int = 1) -> dict:
    """Linear probe of the teacher's frozen features: heads trained on evaluation.knn_train_shards, scored on
    evaluation.knn_val_shards (the labelled splits the k-NN evaluation uses, as dinov2's --train-dataset and
    --val-dataset serve both its k-NN and linear evaluations), with evaluation.linear_* and train.seed. One pass of
    the backbone over both splits (extract_features, every rank), then train_linear on every rank.
    Returns train_linear's results (JSON-ready)."""
    ev = cfg.evaluation
    autocast = _DTYPES[cfg.train.precision] if device.type == "cuda" else None
    was_training = model.training
    model.eval()
    try:
        (train_f, train_l), (val_f, val_l) = (
            extract_features(model.teacher.backbone, build_eval_loader(cfg, shards, rank, world), device, autocast,
                             image_size=ev.image_size, normalize=False, patch_mean=True)
            for shards in (ev.knn_train_shards, ev.knn_val_shards)
        )
    finally:
        model.train(was_training)
    results, classifiers = train_linear(
        train_f, train_l, val_f, val_l, learning_rates=ev.linear_learning_rates, epochs=ev.linear_epochs,
        epoch_length=ev.linear_epoch_length, batch_size=ev.linear_batch_size, cls_dim=train_f.shape[1] // 2,
        seed=cfg.train.seed)
    log.info(f"linear probe: {len(classifiers.heads)} heads, {ev.linear_epochs * ev.linear_epoch_length} iterations "
             f"of {min(ev.linear_batch_size, train_f.shape[0])} on {train_f.shape[0]} features; best "
             f"{results['best_classifier']}: top-1 {results['top1']:.2f}%"
             + (f", top-5 {results['top5']:.2f}%" if "top5" in results else ""))
    return results
