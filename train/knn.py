"""Frozen features of labelled images (k-NN and linear-probe evaluation), and weighted k-NN classification on
them (DINO / dinov2's k-NN evaluation)."""
from __future__ import annotations

from collections.abc import Sized

import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def extract_features(backbone, batches: Sized, device: torch.device, autocast_dtype: torch.dtype | None = None, *,
                     image_size: int = 224, normalize: bool = True, patch_mean: bool = False):
    """Cls features (L2-normalised unless `normalize` is False) and labels of every batch, gathered from all ranks.

    backbone: callable images -> object with `.cls` (B, C) and, for `patch_mean`, `.patches` (B, N, C); batches: a
    loader or list (len() is read first). Returns ((N, C) float32, (N,) int64) on `device`; with `patch_mean`, the
    features are [cls | mean of the patch tokens], (N, 2C), as dinov2's linear probe with use_avgpool (normalised
    as one vector when `normalize`; the mean is taken in fp32). With torch.distributed, every rank calls the
    backbone equally often (a sharded backbone gathers its parameters in each call): the batch counts are agreed
    first, and a rank with fewer batches runs the difference on a throwaway image (its first, or zeros of
    `image_size`); "no images" is decided over all ranks.
    """
    distributed = dist.is_available() and dist.is_initialized()
    calls = len(batches)
    if distributed:
        most = torch.tensor(calls, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        calls = int(most)
    feats, labels, spare, width = [], [], None, None
    for batch in batches:
        if batch.get("labels") is None:
            raise ValueError("k-NN and linear evaluation need labelled shards (<key>.cls in every sample)")
        images = batch["images"].to(device, non_blocking=True)
        spare = images[:1] if spare is None else spare
        f = _features(backbone, images, device, autocast_dtype, patch_mean).float()
        feats.append(F.normalize(f, dim=-1) if normalize else f)
        labels.append(batch["labels"].to(device).long())
        width = feats[-1].shape[1]
    spare = spare if spare is not None else torch.zeros(1, 3, image_size, image_size, device=device)
    for _ in range(calls - len(feats)):
        width = _features(backbone, spare, device, autocast_dtype, patch_mean).shape[1]
    if calls == 0:
        raise ValueError("k-NN / linear evaluation got no images")
    feats = torch.cat(feats) if feats else torch.zeros(0, width, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if distributed:
        feats, labels = _all_gather_rows(feats), _all_gather_rows(labels)
    return feats, labels


def _features(backbone, images: torch.Tensor, device: torch.device, autocast_dtype: torch.dtype | None,
              patch_mean: bool) -> torch.Tensor:
    """(B, C) cls tokens, or (B, 2C) [cls | mean over the patch tokens] with `patch_mean`."""
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = backbone(images)
        return torch.cat([out.cls.float(), out.patches.float().mean(dim=1)], dim=-1) if patch_mean else out.cls


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` over ranks along dim 0 (ranks may hold different row counts)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes, strict=True)])


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[str, float]:
    """Weighted k-NN: each of the k most cosine-similar training features votes for its label with
    weight exp(similarity / temperature). Features must be L2-normalised.
    Returns {"top1": %, "top5": %} (top5 only when there are >= 5 classes)."""
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs non-empty train and test features")
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_features.shape[0])
    correct1 = correct5 = 0
    for start in range(0, test_features.shape[0], chunk):
        q = test_features[start : start + chunk]
        sims, idx = (q @ train_features.t()).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], n_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True)
        truth = test_labels[start : start + chunk, None]
        correct1 += (ranked[:, :1] == truth).any(dim=1).sum().item()
        correct5 += (ranked[:, :5] == truth).any(dim=1).sum().item()
    n = test_features.shape[0]
    result = {"top1": 100.0 * correct1 / n}
    if n_classes >= 5:
        result["top5"] = 100.0 * correct5 / n
    return result
