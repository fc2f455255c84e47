"""Export the trained backbone as plain timm weights: model.safetensors + config.json (timm's local-dir format),
loadable with timm.create_model("local-dir:DIR", pretrained=True); beside them heads.safetensors (DINO / iBOT heads,
mask token, centres) and the training config in config.json, so that the folder can teach a student
(distillation.teacher) or start a run (model.pretrained)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from dinotron.train.config import Config, to_dict
from dinotron.train.model import HEADS_FILE, DinoV2, timm_model_args


def export_backbone(model: DinoV2, cfg: Config, out_dir: str | Path) -> Path:
    """Write model.evaluated's timm ViT (the EMA teacher; the student of a distillation) to out_dir as timm's
    local-dir, and its heads, mask token and the centres to heads.safetensors; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = model.evaluated
    vit = exported.backbone.vit
    state = {k: v.detach().contiguous().cpu() for k, v in vit.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    heads = {k: v for k, v in exported.state_dict().items() if not k.startswith("backbone.vit.")}
    heads.update(dino_center=model.dino_center, ibot_center=model.ibot_center)
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, str(out_dir / HEADS_FILE),
              metadata={"format": "pt"})
    aug = cfg.data.augment
    config = {
        "architecture": cfg.model.arch,
        "num_features": vit.num_features,
        "model_args": timm_model_args(cfg.model),
        "pretrained_cfg": {
            "input_size": [3, cfg.model.img_size, cfg.model.img_size],
            "fixed_input_size": False,
            "mean": list(aug.mean),
            "std": list(aug.std),
            "interpolation": "bicubic",
            "crop_pct": cfg.evaluation.image_size / cfg.evaluation.resize_size,
            "num_classes": 0,
            "license": "apache-2.0",
        },
        "dinotron": {"source": "student backbone (distilled)" if exported is model.student else "teacher backbone",
                     "patch_size": model.patch_size, "config": to_dict(cfg)},
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
