"""Builders shared by several test files (imported as `helpers`; pytest puts tests/ on sys.path).

Test modules import from here, never from each other.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from dinotron.train.config import Config, load_config

# ---- optional backends --------------------------------------------------------------------------

DALI_INSTALLED = importlib.util.find_spec("nvidia.dali") is not None
# A DALI test skips with this reason where DALI is missing, so it can never pass on a fallback.
requires_dali = pytest.mark.skipif(not DALI_INSTALLED, reason="DALI not installed")

# ---- trainer ------------------------------------------------------------------------------------

# The demo-sized ViT of the trainer tests: 32 px global / 16 px local crops, 2 blocks of width 32.
TINY = [
    "model.img_size=32",
    "model.drop_path_rate=0.1",
    "model.timm_kwargs={embed_dim: 32, depth: 2, num_heads: 2, patch_size: 8}",
    "dino.head={n_prototypes: 64, hidden_dim: 32, bottleneck_dim: 16, nlayers: 3}",
    "data.augment.global_size=32",
    "data.augment.local_size=16",
    "data.augment.n_local=2",
]


def tiny_config(*overrides: str) -> Config:
    return load_config(None, TINY + list(overrides))


def tiny_model_off_init(*overrides: str, scale: float = 0.1):
    """DinoV2 of tiny_config(*overrides) with its student weights moved off init by `scale` x N(0, 1), so that every
    crop gives another output."""
    from dinotron.train.model import DinoV2

    model = DinoV2(tiny_config(*overrides))
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


class MemoryLoader:
    """Batches that depend only on (seed, epoch, index), with the loader state protocol of dinotron.pipeline."""

    def __init__(self, batch_size=4, n_global=2, n_local=2, n_batches=3, seed=0):
        self.batch_size, self.n_global, self.n_local = batch_size, n_global, n_local
        self.n_batches, self.seed = n_batches, seed
        self.epoch, self.position = 0, 0

    def __len__(self):
        return self.n_batches

    def set_epoch(self, epoch):
        self.epoch, self.position = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        while self.position < self.n_batches:
            g = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch * 100 + self.position)
            self.position += 1
            yield {
                "global_crops": torch.randn(self.n_global * self.batch_size, 3, 32, 32, generator=g),
                "local_crops": torch.randn(self.n_local * self.batch_size, 3, 16, 16, generator=g),
                "labels": None,
            }

# ---- kernel launches ----------------------------------------------------------------------------


class KernelLaunches(list):
    """The launches of one Triton kernel, recorded by `spy_launches`: each a (grid, args) pair, args
    mapping every argument name the launch passed (positional or keyword) to its value."""

    def grids(self) -> list:
        return [grid for grid, _ in self]

    def arg(self, name: str) -> list:
        return [args[name] for _, args in self]


def spy_launches(monkeypatch, module, name: str) -> KernelLaunches:
    """Record every launch of the Triton kernel `module.<name>` (still run as before), for tests that
    must prove the Triton backend ran, with which grid and tile sizes, and not an eager fallback."""
    kernel, launches = getattr(module, name), KernelLaunches()

    class _Spy:
        def __getitem__(self, grid):
            run = kernel[grid]

            def launch(*args, **kwargs):
                launches.append((grid, {**dict(zip(kernel.arg_names, args, strict=False)), **kwargs}))
                return run(*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, _Spy())
    return launches


# ---- pipeline oracles ---------------------------------------------------------------------------


def read_tar(path: str) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of a WebDataset tar read with tarfile alone (no dinotron, no webdataset), in tar order:
    [(key, {extension: bytes})], the key being the member name up to the first dot of its last component."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                folder, _, name = member.name.rpartition("/")
                stem, _, ext = name.partition(".")
                samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext] = tar.extractfile(member).read()
    return list(samples.items())


def eval_oracle(shards: list[str], image_size: int, resize_size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """dinov2's evaluation transform in plain PIL + torchvision, on every sample of `shards` in order: decode
    (PIL, RGB, pixels as stored), resize the shorter side to resize_size (bicubic, antialiased), centre-crop
    image_size, /255, normalise. Returns ((N, 3, image_size, image_size) float32, (N,) int64 labels of .cls)."""
    import io

    import torchvision.transforms.v2.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    images, labels = [], []
    for path in shards:
        for _, sample in read_tar(path):
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                x = TF.pil_to_tensor(im.convert("RGB"))
            x = TF.resize(x, [resize_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
            x = TF.center_crop(x, [image_size, image_size]).float() / 255
            images.append(TF.normalize(x, list(mean), list(std)))
            labels.append(int(sample["cls"]))
    return torch.stack(images), torch.tensor(labels)


# ---- process groups -----------------------------------------------------------------------------

def join_trainer_ranks(rank: int, world: int, init_file) -> None:
    """Start a gloo process group of `world` ranks through `init_file` (60 s timeout: a collective mismatch
    fails instead of hanging) and export what the trainer's setup_distributed reads, as torchrun would."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))


def leave_ranks() -> None:
    """End a gloo worker that succeeded: a barrier (no rank closes its connections while another still uses
    them), destroy the group, then exit at once. Skipping interpreter finalisation matters: gloo work objects
    still referenced from Python (FSDP2's reduce-scatter handles) destroyed there abort the process (SIGABRT,
    "terminate called without an active exception", seen in CI after every assertion had passed)."""
    import os

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


# ---- dinov2's loss formulas, transcribed: the oracles of the loss tests ----

def dinov2_dino_forward(student_output_list, teacher_out_softmaxed_centered_list, student_temp=0.1):
    """dinov2's DINOLoss.forward, transcribed: every (student view, teacher view) pair, summed."""
    total_loss = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_out_softmaxed_centered_list:
            loss = torch.sum(t * lsm, dim=-1)
            total_loss -= loss.mean()
    return total_loss


def dinov2_ibot_forward_masked(student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                               n_masked_patches=None, masks_weight=None, student_temp=0.1):
    """dinov2's iBOTPatchLoss.forward_masked, transcribed (its lossfunc without xformers)."""
    t = teacher_patch_tokens_masked
    s = student_patch_tokens_masked
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    if masks_weight is None:
        masks_weight = (
            (1 / student_masks_flat.sum(-1).clamp(min=1.0))
            .unsqueeze(-1)
            .expand_as(student_masks_flat)[student_masks_flat]
        )
    if n_masked_patches is not None:
        loss = loss[:n_masked_patches]
    loss = loss * masks_weight
    return -loss.sum() / student_masks_flat.shape[0]


def dinov2_ibot_forward(student_patch_tokens, teacher_patch_tokens, student_masks_flat, student_temp=0.1):
    """dinov2's iBOTPatchLoss.forward (dense (B, N, K) tokens), transcribed."""
    t = teacher_patch_tokens
    s = student_patch_tokens
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    loss = torch.sum(loss * student_masks_flat.float(), dim=-1) / student_masks_flat.sum(dim=-1).clamp(min=1.0)
    return -loss.mean()


def dinov2_collate(masks, dtype=torch.float32):
    """What dinov2's collate_data_and_cast adds for the masks (B, N): mask_indices_list, n_masked_patches
    (an int, as ssl_meta_arch reads it), masks_weight (one per masked patch; dinov2's are fp32, `dtype`
    makes them float64 for float64 tests) and upperbound (the padded row count of the masked-token
    buffers; here the masked count plus 3)."""
    mask_indices_list = masks.flatten().nonzero().flatten()
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0).to(dtype)).unsqueeze(-1).expand_as(masks)[masks]
    return mask_indices_list, mask_indices_list.shape[0], masks_weight, mask_indices_list.shape[0] + 3
