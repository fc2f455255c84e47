"""Export the teacher backbone as plain timm weights: model.safetensors + config.json (timm's
local-dir format), loadable with timm.create_model("local-dir:DIR", pretrained=True)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from dinotron.train.config import Config
from dinotron.train.model import DinoV2, timm_model_args


def export_backbone(model: DinoV2, cfg: Config, out_dir: str | Path) -> Path:
    """Write the teacher's timm ViT (no mask token, no heads) to out_dir; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vit = model.teacher.backbone.vit
    state = {k: v.detach().contiguous().cpu() for k, v in vit.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
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
        "dinotron": {"source": "teacher backbone", "patch_size": model.patch_size},
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
