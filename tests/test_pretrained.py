"""model.pretrained: student and teacher start from exported / timm / dinov2-format weights, no network.

Oracles: the exporting model's own forward (an export loaded back at the same size must give the same features to
fp32 rounding, 1e-5), timm's position-embedding resampling (resample_abs_pos_embed, called here directly), and the
source tensors themselves for every other weight (exact copies).
"""
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from dinotron.train.export import export_backbone
from dinotron.train.model import DinoV2
from helpers import tiny_config


@pytest.fixture
def exported(tmp_path):
    """A tiny model with non-trivial teacher weights, exported (dinotron export's folder)."""
    cfg = tiny_config("model.num_registers=2")
    model = DinoV2(cfg).eval()
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.dino_center.normal_()
    return model, export_backbone(model, cfg, tmp_path / "export")


def test_export_folder_starts_student_and_teacher(exported):
    source, folder = exported
    for spelling in (str(folder), f"local-dir:{folder}", str(folder / "model.safetensors")):
        model = DinoV2(tiny_config("model.num_registers=2", f"model.pretrained={spelling}")).eval()
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = source.teacher.backbone(images).cls
            for part in (model.student, model.teacher):
                torch.testing.assert_close(part.backbone(images).cls, expected, rtol=1e-5, atol=1e-5)
        # an export folder brings its heads and centres (they fit); a lone weights file does not
        heads_loaded = torch.equal(model.student.dino_head.mlp[0].weight, source.teacher.dino_head.mlp[0].weight)
        assert heads_loaded == (not spelling.endswith(".safetensors"))
        if heads_loaded:
            assert torch.equal(model.teacher.dino_head.mlp[0].weight, source.teacher.dino_head.mlp[0].weight)
            assert torch.equal(model.dino_center, source.dino_center)


def test_export_heads_that_do_not_fit_start_fresh(exported):
    source, folder = exported
    model = DinoV2(tiny_config("model.num_registers=2", f"model.pretrained={folder}",
                               "dino.head={n_prototypes: 32, hidden_dim: 32, bottleneck_dim: 16, nlayers: 3}"))
    assert model.dino_center.shape == (1, 32) and not model.dino_center.any()
    assert not torch.equal(model.student.dino_head.mlp[0].weight, source.teacher.dino_head.mlp[0].weight)


def test_position_embedding_resampled_to_the_grid(exported):
    source, folder = exported
    model = DinoV2(tiny_config("model.num_registers=2", "model.img_size=48", f"model.pretrained={folder}"))
    vit = source.teacher.backbone.vit
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens  # here: class + 2 register positions
    assert vit.pos_embed.shape[1] == prefix + 16  # the 4 x 4 grid of 32 px at patch 8
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), [6, 6], num_prefix_tokens=prefix)
    torch.testing.assert_close(model.student.backbone.vit.pos_embed, expected)
    src_blocks = source.teacher.backbone.vit.blocks.state_dict()
    for k, v in model.teacher.backbone.vit.blocks.state_dict().items():
        assert torch.equal(v, src_blocks[k]), k


def test_other_architecture_is_refused(exported, tmp_path):
    _, folder = exported
    with pytest.raises(ValueError, match=r"model.pretrained: .* does not match model.arch=.*shape"):
        DinoV2(tiny_config("model.num_registers=2", f"model.pretrained={folder}",
                           "model.timm_kwargs={embed_dim: 64, depth: 2, num_heads: 2, patch_size: 8}"))
    with pytest.raises(ValueError, match="missing: blocks.2"):
        DinoV2(tiny_config("model.num_registers=2", f"model.pretrained={folder}",
                           "model.timm_kwargs={embed_dim: 32, depth: 3, num_heads: 2, patch_size: 8}"))
    with pytest.raises(ValueError, match="has 2 attention heads, model.arch=.* 4"):
        DinoV2(tiny_config("model.num_registers=2", f"model.pretrained={folder}",
                           "model.timm_kwargs={embed_dim: 32, depth: 2, num_heads: 4, patch_size: 8}"))
    for bad in (tmp_path / "nothing-here.safetensors", "not_a_timm_model_name"):
        with pytest.raises(ValueError, match="neither a file, a folder nor a timm model name"):
            DinoV2(tiny_config(f"model.pretrained={bad}"))


def test_dinov2_checkpoint_format_with_mask_token(exported, tmp_path):
    """dinov2's own checkpoints: timm's key names plus mask_token (1, D), wrapped in {"teacher": ...} by its trainer."""
    source, _ = exported
    vit = source.teacher.backbone.vit
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    state["mask_token"] = torch.randn(1, 32)
    torch.save({"teacher": state}, tmp_path / "teacher_checkpoint.pth")
    model = DinoV2(tiny_config("model.num_registers=2", f"model.pretrained={tmp_path / 'teacher_checkpoint.pth'}"))
    torch.testing.assert_close(model.student.backbone.mask_token, state["mask_token"])
    torch.testing.assert_close(model.teacher.backbone.vit.cls_token, vit.cls_token)
    save_file({"cls_token": vit.cls_token.detach().contiguous()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="missing: "):
        DinoV2(tiny_config("model.num_registers=2", f"model.pretrained={tmp_path / 'partial.safetensors'}"))
