"""Trainer building blocks: config, masking, schedules, parameter groups, EMA, losses, checkpoints, k-NN, export."""
import logging
import math
import random
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

from dinotron.kernels import reference as ref
from dinotron.train import checkpoint as ckpt
from dinotron.train.config import Config, ConfigError, from_dict, load_config, to_dict
from dinotron.train.export import export_backbone
from dinotron.train.knn import knn_classify
from dinotron.train.log import setup_logging
from dinotron.train.loop import CollapseWatch
from dinotron.train.masking import BlockMaskGenerator, masked_patch_indices, sample_masks_for_rank
from dinotron.train.model import DINOHead, DinoV2
from dinotron.train.optim import apply_schedules, build_optimizer, layer_id, param_groups
from dinotron.train.parallel import LaunchEnv, launch_env, parallelize
from dinotron.train.schedules import CosineSchedule, build_schedules, scaled_lr
from helpers import tiny_config, tiny_model_off_init

ROOT = Path(__file__).resolve().parent.parent

# ---- config -------------------------------------------------------------------------------------

def test_config_defaults_are_dinov2s():
    cfg = Config()
    assert (cfg.dino.head.n_prototypes == 65536 and cfg.dino.head.bottleneck_dim == 256
            and cfg.dino.koleo_loss_weight == 0.1)
    assert cfg.ibot.mask_sample_probability == 0.5 and cfg.ibot.mask_ratio_min_max == (0.1, 0.5)
    assert (cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher) == (0.992, 1.0)
    assert (cfg.teacher.warmup_teacher_temp, cfg.teacher.teacher_temp, cfg.teacher.center_momentum) == (0.04, 0.07, 0.9)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.clip_grad) == (0.04, 0.2, 3.0)
    assert (cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult, cfg.train.epoch_length) == (0.9, 0.2, 1250)


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  base_lr: 0.001\nibot:\n  mask_ratio_min_max: [0.2, 0.4]\n")
    cfg = load_config(path, ["optim.epochs=3", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=1",
                             "teacher.centering=sinkhorn_knopp", "data.train_shards=a-{0..3}.tar", "optim.min_lr=1e-7"])
    assert cfg.optim.base_lr == 0.001 and cfg.optim.epochs == 3 and cfg.optim.min_lr == 1e-7
    assert cfg.ibot.mask_ratio_min_max == (0.2, 0.4)
    assert cfg.teacher.centering == "sinkhorn_knopp"
    assert cfg.data.train_shards == ["a-{0..3}.tar"]
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.base_lrr=0.1", r"unknown config key 'optim.base_lrr'; did you mean optim.base_lr"),
        ("optimizer.lr=0.1", r"unknown config key 'optimizer'; did you mean optim"),
        ("optim.epochs=ten", r"'optim.epochs' must be an integer"),
        ("optim.base_lr=fast", r"'optim.base_lr' must be a number"),
        ("teacher.centering=sinkhorn", r"'teacher.centering' must be one of \['softmax', 'sinkhorn_knopp'\]"),
        ("ibot.mask_ratio_min_max=[0.1]", r"must have 2 items"),
        ("train.progress=maybe", r"must be true or false"),
        ("epochs", r"not of the form key=value"),
        ("optim.epochs=5", r"optim.warmup_epochs \(10\) .* must not exceed optim.epochs \(5\)"),
        ("data.augment.flip_p=2", r"data.augment: MultiCropConfig.flip_p must be probabilities"),
    ],
)
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_set_what_their_yaml_says(path):
    """Every leaf the YAML file sets (read here with yaml, not through the config code) is the loaded value."""
    def leaves(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict) and k != "timm_kwargs":
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    loaded = to_dict(load_config(path))
    for key, value in leaves(yaml.safe_load(path.read_text())):
        got = loaded
        for part in key.split("."):
            got = got[part]
        assert got == (list(value) if isinstance(value, tuple) else value), key


# ---- masking ------------------------------------------------------------------------------------

def test_block_mask_generator_masks_rectangles_within_budget():
    gen = BlockMaskGenerator((16, 16), max_num_patches=128)
    rng = random.Random(0)
    counts = []
    for target in (26, 64, 128):
        for _ in range(20):
            m = gen(target, rng)
            assert m.shape == (16, 16) and m.dtype == torch.bool
            assert 0 < m.sum() <= target
            counts.append(m.sum().item() / target)
    # The generator stops short of its target only when 10 redraws of a rectangle all fail: the mean
    # fill was 0.998 for these draws (0.9986 over 6,000); 0.98 leaves room for another RNG stream.
    assert sum(counts) / len(counts) > 0.98, "block masks should come close to their target area"


def global_masks(step, seed, gen, n_global, batch_size, world, **kwargs):
    """The step's masks of every rank, in the order of one rank holding the whole global batch: rank r's row
    v * B + j is global crop v * (B * world) + j * world + r (the loaders deal samples round-robin)."""
    parts = [sample_masks_for_rank(step, seed, gen, n_global, batch_size, r, world, **kwargs) for r in range(world)]
    return torch.stack([m.view(n_global, batch_size, -1) for m in parts], dim=2).flatten(0, 2)


def test_sample_masks_statistics():
    gen = BlockMaskGenerator((16, 16), max_num_patches=128)
    ratios = []
    for step in range(20):
        masks = sample_masks_for_rank(step, 1, gen, n_global=2, batch_size=32, mask_probability=0.5,
                                      ratio_min_max=(0.1, 0.5))
        assert masks.shape == (64, 256) and masks.dtype == torch.bool
        per_image = masks.sum(dim=1)
        assert (per_image > 0).sum() == 32, "int(64 * 0.5) crops get a mask"
        ratios += (per_image[per_image > 0] / 256).tolist()
    assert max(ratios) <= 0.5 + 1e-6
    # Targets int(256 * u), u stratified over 32 slices of [0.1, 0.5]: mean 0.298, filled to 0.998 of
    # it (above); measured 0.2979 here, 0.2977 over 1,000 steps. 0.01 is ~2x the standard error of
    # unstratified draws (0.115 / sqrt(640)).
    assert abs(sum(ratios) / len(ratios) - 0.298) < 0.01, "ratios spread over [0.1, 0.5], mean about 0.3"
    # One crop per step falls in the first and in the last slice: [0.1, 0.1125] and [0.4875, 0.5].
    assert min(ratios) <= 0.1125 and max(ratios) >= 0.4875 * 0.98
    again = sample_masks_for_rank(5, 1, gen, 2, 32)
    assert torch.equal(again, sample_masks_for_rank(5, 1, gen, 2, 32)), "masks are a function of (seed, step)"
    assert not torch.equal(again, sample_masks_for_rank(6, 1, gen, 2, 32)), "another step, other masks"
    assert not torch.equal(again, sample_masks_for_rank(5, 2, gen, 2, 32)), "another seed, other masks"


@pytest.mark.parametrize("world,batch_size", [(2, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("step", [0, 7])
def test_masks_do_not_depend_on_the_world_size(world, batch_size, step):
    """Oracle: one rank holding the whole global batch of 8 images (16 global crops)."""
    gen = BlockMaskGenerator((8, 8), max_num_patches=32)
    one_rank = sample_masks_for_rank(step, 3, gen, n_global=2, batch_size=8)
    assert torch.equal(global_masks(step, 3, gen, 2, batch_size, world), one_rank)


@pytest.mark.parametrize("n_global,batch_size,world,p",
                         [(2, 3, 4, 0.3), (1, 5, 3, 0.5), (3, 2, 2, 0.9), (2, 4, 2, 0.0)])
def test_masks_count_int_n_p_over_the_global_batch(n_global, batch_size, world, p):
    gen = BlockMaskGenerator((8, 8), max_num_patches=32)
    n = n_global * batch_size * world
    masks = global_masks(0, 0, gen, n_global, batch_size, world, mask_probability=p)
    assert masks.shape == (n, 64)
    assert int(masks.any(dim=1).sum()) == int(n * p)


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 2, "world": 2}, "rank"),
    ({"batch_size": 0}, "batch_size"),
])
def test_sample_masks_for_rank_checks_its_arguments(kwargs, match):
    args = {"step": 0, "seed": 0, "generator": BlockMaskGenerator((8, 8)), "n_global": 2, "batch_size": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        sample_masks_for_rank(**args)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_masked_patch_indices_pick_what_boolean_indexing_picks(p):
    """Oracle: x[masks] (boolean indexing), rows and order."""
    masks = torch.rand(6, 16) < p
    x = torch.randn(6, 16, 5)
    picked = x.flatten(0, 1).index_select(0, masked_patch_indices(masks))
    assert torch.equal(picked, x[masks])


# ---- schedules ----------------------------------------------------------------------------------

def test_cosine_schedule_shape():
    s = CosineSchedule(1.0, 0.1, total_steps=110, warmup_steps=10)
    assert s[0] == 0.0 and s[9] == pytest.approx(1.0) and s[10] == pytest.approx(1.0)
    assert s[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert s[109] == pytest.approx(0.1, abs=1e-3) and s[1000] == 0.1


def test_dinov2_schedules():
    cfg = Config()
    s = build_schedules(cfg, total_batch=256)
    peak = 0.004 * math.sqrt(256 / 1024)
    assert scaled_lr(0.004, 256, "sqrt_wrt_1024") == pytest.approx(peak)
    assert s.lr[0] == 0.0 and s.lr[12499] == pytest.approx(peak) and s.lr[125000] == pytest.approx(1e-6)
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[125000] == pytest.approx(0.2)
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[124999] == pytest.approx(1.0, abs=1e-6)
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[37499] == pytest.approx(0.07)
    assert s.teacher_temp[18750] == pytest.approx(0.055, abs=1e-4) and s.teacher_temp[99999] == 0.07
    assert all(s.last_layer_lr[i] == 0.0 for i in (0, 600, 1249))
    assert s.last_layer_lr[1250] == s.lr[1250] > 0


# ---- parameter groups, EMA, freezing ------------------------------------------------------------

def test_param_groups_multipliers():
    cfg = tiny_config()
    model = DinoV2(cfg)
    groups = param_groups(model.student, cfg.optim)
    by_name = {n: g for g in groups for n in g["names"]}
    d = cfg.optim.layerwise_decay
    assert layer_id("vit.blocks.1.attn.qkv.weight", 2) == 2 and layer_id("vit.pos_embed", 2) == 0
    assert by_name["backbone.vit.blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(d**2)
    assert by_name["backbone.vit.blocks.1.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(d)
    assert by_name["backbone.vit.norm.weight"]["lr_multiplier"] == 1.0
    assert by_name["backbone.vit.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(d**3 * 0.2)
    assert by_name["backbone.vit.cls_token"]["lr_multiplier"] == pytest.approx(d**3)
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    for name in ("backbone.vit.cls_token", "backbone.vit.pos_embed", "backbone.mask_token",
                 "backbone.vit.blocks.0.ls1.gamma", "backbone.vit.blocks.0.norm1.weight",
                 "backbone.vit.blocks.0.attn.qkv.bias", "dino_head.mlp.0.bias"):
        assert by_name[name]["wd_multiplier"] == 0.0, name
    assert by_name["backbone.vit.blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    last = [n for n, g in by_name.items() if g["is_last_layer"]]
    assert last and all(n.startswith("dino_head.last_layer.") for n in last)
    assert sum(len(g["params"]) for g in groups) == len(list(model.student.parameters()))


def test_last_layer_frozen_while_its_lr_is_zero():
    cfg = tiny_config()
    model = DinoV2(cfg)
    opt = build_optimizer(model.student, cfg.optim)
    apply_schedules(opt, lr=1e-2, last_layer_lr=0.0, wd=0.04)
    last = {n: p.detach().clone() for n, p in model.student.dino_head.last_layer.named_parameters()}
    mlp = model.student.dino_head.mlp[0].weight.detach().clone()
    out = model.student.dino_head(torch.randn(8, 32))
    out.logsumexp(dim=1).mean().backward()
    opt.step()
    for n, p in model.student.dino_head.last_layer.named_parameters():
        assert torch.equal(p, last[n]), n
    assert not torch.equal(model.student.dino_head.mlp[0].weight, mlp)


def test_ema_update():
    model = DinoV2(tiny_config())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    t0 = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for before, t, s in zip(t0, model.teacher.parameters(), model.student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * before + 0.1 * s)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_head_logits_in_fp16_under_bf16_autocast():
    """The prototype logits (cosines) leave the head in fp16 under bf16 autocast, fp32 otherwise."""
    head = DINOHead(32, tiny_config().dino.head)
    x = torch.randn(5, 32)
    with torch.no_grad():
        normalized = F.normalize(head.mlp(x), dim=-1)
        assert head(x).dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = head(x)
            assert bf16.dtype == torch.float16
            assert head.last_layer(normalized).dtype == torch.bfloat16  # what it would be without the switch
        with torch.autocast("cpu", dtype=torch.float16):
            assert head(x).dtype == torch.float16


# ---- the objective equals the reference ops composed as dinov2 does -----------------------------

@pytest.mark.parametrize("fused", ["true", "false"])
@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_loss_composition_matches_dinov2(centering, fused):
    """The objective, with the prototype layers fused into the losses (model.fused_head) or not, equals dinov2's
    ssl_meta_arch written out with the reference ops (fp32 on CPU: 1e-5 relative)."""
    cfg = tiny_config(f"teacher.centering={centering}", "model.drop_path_rate=0.0", f"model.fused_head={fused}")
    model = DinoV2(cfg)
    with torch.no_grad():  # weights far from init, so that every crop gets a different output
        for p in model.student.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.teacher.load_state_dict({k: v + 0.05 * torch.randn_like(v)
                                       for k, v in model.student.state_dict().items()})
        model.dino_center.normal_()
    B, n_local, temp = 3, cfg.data.augment.n_local, 0.05
    g, local = torch.randn(2 * B, 3, 32, 32), torch.randn(n_local * B, 3, 16, 16)
    masks = torch.zeros(2 * B, 16, dtype=torch.bool)
    masks[0, :5] = masks[3, 7:9] = masks[4, 2] = True
    center0 = model.dino_center.clone()
    out = model(g, local, masks, temp)

    # dinov2's ssl_meta_arch, written out with the reference ops
    with torch.no_grad():
        t = model.teacher.backbone(g)
        t_logits = model.teacher.dino_head(torch.cat([t.cls, t.patches[masks]]))
        t_cls, t_patch = t_logits[: 2 * B], t_logits[2 * B :]
        if centering == "softmax":
            t_cls_p = ref.softmax_center_teacher(t_cls, center0, temp)
            t_patch_p = ref.softmax_center_teacher(t_patch, torch.zeros(1, 64), temp)
        else:
            t_cls_p = ref.sinkhorn_knopp_teacher(t_cls, temp)
            t_patch_p = ref.sinkhorn_knopp_teacher(t_patch, temp)
    t_swapped = torch.cat(t_cls_p.chunk(2)[::-1])
    sg, sl = model.student.backbone(g, masks), model.student.backbone(local)
    s_logits = model.student.dino_head(torch.cat([sl.cls, sg.cls, sg.patches[masks]]))
    s_local, s_global, s_patch = (s_logits[: n_local * B], s_logits[n_local * B : (n_local + 2) * B],
                                  s_logits[(n_local + 2) * B :])
    n_terms = 2 * 1 + n_local * 2

    def ce(s, tp):
        return -(tp * F.log_softmax(s / 0.1, dim=-1)).sum(dim=-1).mean()

    local_loss = sum(ce(s, tp) for s in s_local.chunk(n_local) for tp in t_cls_p.chunk(2)) / n_terms
    global_loss = ce(s_global, t_swapped) * 2 / n_terms
    koleo = 0.1 * sum(ref.koleo_loss(c) for c in sg.cls.chunk(2))
    weights = (1 / masks.sum(-1).clamp(min=1))[:, None].expand_as(masks)[masks]
    ibot = -((t_patch_p * F.log_softmax(s_patch / 0.1, dim=-1)).sum(-1) * weights).sum() / masks.shape[0]
    torch.testing.assert_close(out["dino_loss"], local_loss + global_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["koleo_loss"] * 0.1, koleo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ibot_loss"], ibot, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], local_loss + global_loss + koleo + ibot, rtol=1e-5, atol=1e-6)
    if centering == "softmax":
        torch.testing.assert_close(model.dino_center, ref.update_center(center0, t_cls, 0.9))


def test_fused_heads_give_the_unfused_gradients():
    """Every student parameter's gradient (prototypes included) and the new centres equal the unfused path's
    (fp32, same weights and inputs; 1e-5 relative, fp32 sums in another order)."""
    torch.manual_seed(0)
    cfg = tiny_config("model.drop_path_rate=0.0", "model.fused_head=false")
    unfused = DinoV2(cfg)
    with torch.no_grad():
        for p in unfused.student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fused = DinoV2(tiny_config("model.drop_path_rate=0.0"))
    fused.load_state_dict(unfused.state_dict())
    g, local = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 16, 16)
    masks = torch.zeros(6, 16, dtype=torch.bool)
    masks[0, :5] = masks[4, 2:9] = True
    grads = []
    for model in (unfused, fused):
        model(g, local, masks, 0.05)["loss"].backward()
        grads.append({k: p.grad for k, p in model.student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("last_layer" in k for k in grads[1])
    for k, v in grads[0].items():
        torch.testing.assert_close(grads[1][k], v, rtol=1e-5, atol=1e-7, msg=k)
    for name in ("dino_center", "ibot_center"):
        torch.testing.assert_close(getattr(fused, name), getattr(unfused, name))


# ---- collapse watch -----------------------------------------------------------------------------

def test_collapse_watch_warns_after_patience():
    watch = CollapseWatch(patience=3)
    healthy = {"teacher_entropy": 0.5, "prototypes_in_use": 0.6, "feature_std": 0.8}
    collapsed = {"teacher_entropy": 0.999, "prototypes_in_use": 0.6, "feature_std": 0.8}
    assert watch.update(1, healthy) is None
    assert watch.update(2, collapsed) is None and watch.update(3, collapsed) is None
    message = watch.update(4, collapsed)
    assert message and "step 4" in message and "near-uniform" in message
    assert watch.update(5, collapsed) is None, "warn once per episode"


# ---- checkpoints --------------------------------------------------------------------------------

def _save(directory, step, **kwargs):
    sharded = {"w": torch.full((3,), float(step))}
    return ckpt.save_checkpoint(directory, step, sharded=sharded, meta={"step": step}, rank_state={"r": step}, **kwargs)


def test_checkpoints_atomic_and_pruned(tmp_path, monkeypatch):
    for step in (10, 20, 30):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-00000020", "checkpoint-00000030"]
    latest = ckpt.latest_checkpoint(tmp_path)
    loaded = {"w": torch.zeros(3)}
    ckpt.load_sharded(latest, loaded)
    assert ckpt.load_meta(latest) == {"step": 30} and torch.equal(loaded["w"], torch.full((3,), 30.0))
    assert ckpt.load_rank_state(latest, 0) == {"r": 30} and ckpt.load_rank_state(latest, 1) is None

    def broken_write(path, obj):  # the meta file fails: the shards are written, the folder is never renamed
        raise OSError("disk full")

    real_write = ckpt._write
    monkeypatch.setattr(ckpt, "_write", lambda path, obj: broken_write(path, obj) if path.name == ckpt.META
                        else real_write(path, obj))
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 40, keep_last=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-00000040.tmp", "checkpoint-00000020",
                                                          "checkpoint-00000030"]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-00000030", "the partial one is ignored"
    _save(tmp_path, 50, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000030", "checkpoint-00000050"], (
        "the next save removes the partial one")
    ckpt.save_checkpoint(tmp_path, 50, sharded={"w": torch.full((3,), -1.0)}, meta={"step": 50}, rank_state={},
                         keep_last=2)  # the same step again (a resumed run that stopped where it started)
    again = {"w": torch.zeros(3)}
    ckpt.load_sharded(tmp_path / "checkpoint-00000050", again)
    assert torch.equal(again["w"], torch.full((3,), -1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000030", "checkpoint-00000050"]
    (tmp_path / "checkpoint-00000060").mkdir()  # no meta.pt: not a checkpoint
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-00000050"
    (tmp_path / "checkpoint-00000050" / ckpt.META).write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        ckpt.load_meta(ckpt.latest_checkpoint(tmp_path))


# ---- k-NN ---------------------------------------------------------------------------------------

def test_knn_weighted_vote():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]), dim=1)
    train_labels = torch.tensor([0, 0, 1, 1, 1])
    test = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert knn_classify(train, train_labels, test, torch.tensor([0, 1]), k=5)["top1"] == 100.0
    # k=5 majority would say class 1 (three neighbours); the temperature-weighted vote says class 0
    q = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    assert knn_classify(train, train_labels, q, torch.tensor([0]), k=5, temperature=0.07)["top1"] == 100.0
    assert knn_classify(train, train_labels, q, torch.tensor([0]), k=5, temperature=100.0)["top1"] == 0.0


# ---- export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layerscale", ["1e-5", "null"])
def test_export_round_trip_through_timm(tmp_path, layerscale):
    cfg = tiny_config("model.num_registers=2", f"model.layerscale={layerscale}")
    model = DinoV2(cfg).eval()
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    has_layerscale = isinstance(model.teacher.backbone.vit.blocks[0].ls1, torch.nn.Identity) is False
    assert has_layerscale == (layerscale != "null"), "layerscale=null disables LayerScale (timm ignores None)"
    out = export_backbone(model, cfg, tmp_path / "export")
    images = torch.randn(2, 3, 32, 32)
    expected = model.teacher.backbone(images).cls
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(images)[:, 0], expected, rtol=1e-5, atol=1e-5)
        # other crop sizes work too (dynamic image size)
        assert loaded.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 2 + 1 + 36, 32)


# ---- packed multi-crop forward ------------------------------------------------------------------

def test_packed_crops_equal_separate_forwards():
    model = tiny_model_off_init("model.attention=dinotron", "model.pack_crops=true", "model.drop_path_rate=0.0")
    g, local = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)
    masks = torch.rand(4, 16) < 0.3
    backbone = model.student.backbone
    packed_g, packed_l = backbone.forward_packed([(g, masks), (local, None)])
    sep_g, sep_l = backbone(g, masks), backbone(local)
    torch.testing.assert_close(packed_g.cls, sep_g.cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_g.patches, sep_g.patches, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_l.cls, sep_l.cls, rtol=1e-5, atol=1e-5)
    # The whole objective and its gradients against the same weights run unpacked with timm's attention.
    unpacked = DinoV2(tiny_config("model.drop_path_rate=0.0"))
    unpacked.load_state_dict(model.state_dict())
    out, ref_out = model(g, local, masks, 0.04), unpacked(g, local, masks, 0.04)
    out["loss"].backward()
    ref_out["loss"].backward()
    # fp32 with another summation order in attention (Triton tiles vs timm's SDPA): measured 1.2e-7
    # relative on the loss and at most 1.4e-6 absolute on the gradients (entries up to ~1e-1).
    torch.testing.assert_close(out["loss"], ref_out["loss"], rtol=1e-5, atol=1e-6)
    grads = dict(model.student.named_parameters())
    for name, p in unpacked.student.named_parameters():
        assert grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_drop_path_drops_whole_packed_sequences():
    cfg = tiny_config("model.drop_path_rate=0.5")
    backbone = DinoV2(cfg).student.backbone.train()
    drop = backbone.vit.blocks[0].drop_path1
    assert drop.drop_prob == 0.5, "drop_path_uniform gives every block the full rate"
    with backbone._packing.sequences([(20, 5), (20, 3)], torch.device("cpu")):
        out = drop(torch.ones(1, 160, 4))
    per_token = out[0, :, 0]
    for seq in per_token.split([5] * 20 + [3] * 20):
        assert seq.unique().numel() == 1 and seq[0].item() in (0.0, 2.0)
    assert 0 < (per_token == 0).sum() < 160
    batch = drop(torch.ones(64, 7, 4))
    assert all(b.unique().numel() == 1 for b in batch), "unpacked: one draw per sample, as timm"


# ---- logging ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "rank,all_ranks,shown",
    [
        ("0", False, ["info line", "WARNING: warning line", "ERROR: error line"]),
        ("1", False, ["[rank 1] ERROR: error line"]),  # other ranks: errors only
        ("1", True, ["[rank 1] info line", "[rank 1] WARNING: warning line", "[rank 1] ERROR: error line"]),
    ],
)
def test_dinotron_logger_shows_rank_0_by_default(monkeypatch, capsys, rank, all_ranks, shown):
    monkeypatch.setenv("RANK", rank)
    logger = setup_logging(all_ranks=all_ranks)
    try:
        child = logging.getLogger("dinotron.train.anything")  # modules log to children of `dinotron`
        child.info("info line")
        child.warning("warning line")
        child.error("error line")
        child.debug("debug line")  # below the default level
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
    assert capsys.readouterr().err.splitlines() == shown


# ---- launch environment ---------------------------------------------------------------------------

SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456"}
PORT = "28544"  # 20000 + 123456 % 12768


@pytest.mark.parametrize("environ,expected", [
    ({}, LaunchEnv(0, 1, 0, None, None, "none")),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"},
     LaunchEnv(3, 4, 1, "h", "29500", "torchrun")),
    # torchrun inside an srun allocation (one task per node): torchrun's variables win
    ({**SRUN, "RANK": "2", "WORLD_SIZE": "16", "LOCAL_RANK": "2"}, LaunchEnv(2, 16, 2, None, None, "torchrun")),
    ({**SRUN, "SLURM_JOB_NODELIST": "node[01-04],gpu7"}, LaunchEnv(5, 8, 1, "node01", PORT, "slurm")),
    ({**SRUN, "SLURM_JOB_NODELIST": "gpu7,node[01-04]"}, LaunchEnv(5, 8, 1, "gpu7", PORT, "slurm")),
    ({**SRUN, "SLURM_JOB_NODELIST": "r[2-3]-n[009,011-012]-ib"}, LaunchEnv(5, 8, 1, "r2-n009-ib", PORT, "slurm")),
    ({**SRUN, "SLURM_JOB_NODELIST": "a.b-c"}, LaunchEnv(5, 8, 1, "a.b-c", PORT, "slurm")),
    # exported MASTER_ADDR / MASTER_PORT win over the node list and the job id
    ({**SRUN, "SLURM_JOB_NODELIST": "weird[", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"},
     LaunchEnv(5, 8, 1, "10.0.0.1", "1234", "slurm")),
    # one task needs no rendezvous, whatever the node list
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "weird["},
     LaunchEnv(0, 1, 0, None, None, "slurm")),
])
def test_launch_env_reads_torchrun_then_slurm(environ, expected):
    assert launch_env(environ) == expected


@pytest.mark.parametrize("nodelist", ["", "node[01-04", "node]1", ",node1", "node[a-b]"])
def test_launch_env_names_master_addr_where_the_node_list_is_unreadable(nodelist):
    environ = {**SRUN, "SLURM_JOB_NODELIST": nodelist} if nodelist else SRUN
    with pytest.raises(ValueError, match=r"SLURM_JOB_NODELIST=.*export MASTER_ADDR"):
        launch_env(environ)


# ---- activation checkpointing and compile (train/parallel.py) --------------------------------------

def _loss_and_grads(*overrides):
    """One step's loss and student gradients of the tiny model prepared by parallelize (one process)."""
    cfg = tiny_config("model.drop_path_rate=0.0", *overrides)
    torch.manual_seed(0)
    model = DinoV2(cfg)
    parallelize(model, cfg, 1, torch.device("cpu"))
    calls = []
    model.student.backbone.vit.blocks[0].mlp.register_forward_hook(lambda *args: calls.append(1))
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(4, 16, generator=g) < 0.3
    out = model(torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 16, 16, generator=g), masks, 0.04)
    out["loss"].backward()
    return out["loss"], {n: p.grad for n, p in model.student.named_parameters()}, len(calls), model


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_recomputes_and_changes_nothing(mode):
    loss, grads, calls, _ = _loss_and_grads()
    ck_loss, ck_grads, ck_calls, _ = _loss_and_grads(f"train.activation_checkpointing={mode}")
    # a block's MLP runs once per crop batch (global, local) in forward, and again in backward when recomputed
    assert (calls, ck_calls) == (2, 4)
    # the same fp32 operations run again on the same inputs: bitwise equal
    assert torch.equal(loss, ck_loss)
    for name, grad in grads.items():
        assert torch.equal(grad, ck_grads[name]), name


def test_compile_per_block_matches_eager():
    # LayerScale off: with gamma = 1e-5 the gamma gradients are sums that cancel to ~1e-3 of their terms,
    # where any reordering moves them by 0.4 %; without it the gradients are well conditioned.
    loss, grads, _, _ = _loss_and_grads("model.layerscale=null")
    c_loss, c_grads, _, model = _loss_and_grads("model.layerscale=null", "model.compile=true")
    for part in (model.student, model.teacher):
        assert all(block._compiled_call_impl is not None for block in part.backbone.vit.blocks)
    # inductor fuses and reorders fp32 arithmetic: measured the same loss and gradients within 1.8e-6 of
    # each tensor's largest entry; 1e-5 of it, with fp32's default rtol
    torch.testing.assert_close(c_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(c_grads[name], grad, rtol=1.3e-6, atol=1e-5 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("overrides,world,match", [
    (["train.parallel=none"], 2, "train.parallel=none runs one process, not 2"),
    (["train.activation_checkpointing=full", "model.attention=dinotron", "model.pack_crops=true"], 1,
     "activation_checkpointing needs model.pack_crops=false"),
])
def test_parallelize_refuses_what_would_train_wrong(overrides, world, match):
    cfg = tiny_config(*overrides)
    with pytest.raises(ValueError, match=match):
        parallelize(DinoV2(cfg), cfg, world, torch.device("cpu"))
