"""dinotron.configs: the training configs shipped in the package, as named presets.

Every `*.yaml` in this folder is a preset named after its file with `_` written `-` (`vits14_imagenet.yaml` is
`vits14-imagenet`): `dinotron train --preset vits14-imagenet`, `dinotron presets` lists them, `dinotron presets
--show NAME` prints one as a starting file for `--config`. They are package data found through importlib.resources,
so they work from an installed wheel as from a checkout. Each file opens with a comment whose first sentence is its
summary in the listing.
"""
from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SUMMARY_WIDTH = 100  # characters of a summary in `dinotron presets`: one line in a terminal beside the name


def presets() -> dict[str, Traversable]:
    """{name: YAML file} of every shipped preset, sorted by name."""
    files = sorted((f for f in resources.files(__name__).iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    return {f.name.removesuffix(".yaml").replace("_", "-"): f for f in files}


def preset_file(name: str) -> Traversable:
    """The YAML file of preset `name`; ValueError naming the presets for an unknown name."""
    found = presets()
    if name not in found:
        raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(found)}")
    return found[name]


def summary(yaml_text: str) -> str:
    """The first sentence of a YAML file's opening comment ('' if none); one longer than SUMMARY_WIDTH characters is
    cut at its last clause boundary (', ', '; ', ' (') that fits, or else at a word, and ends '...'."""
    lines = []
    for line in yaml_text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    sentence = re.split(r"(?<=[.!?])\s", " ".join(lines).strip(), maxsplit=1)[0]
    if len(sentence) <= SUMMARY_WIDTH:
        return sentence
    head = sentence[:SUMMARY_WIDTH - 3]
    cut = max(head.rfind(", "), head.rfind("; "), head.rfind(" ("))
    return (head[:cut] if cut > 0 else head.rsplit(" ", 1)[0]) + "..."
