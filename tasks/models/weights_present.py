"""Whether a filter run's local weight files are there, answered without torch, open_clip or Prefect.

The command line asks this before it imports those (which takes seconds), so a run without weights ends
at once with the planner's own sentence (tasks/filter/plan.py): `refuse_missing_weights` makes the
planner's checks of the CLIP model config, the CLIP checkpoint and the NSFW head's file, in that order,
through the same code where it can be imported without torch (tasks/models/clip_resolve.py);
`refuse_missing_head` is the head's check alone (for `score-embeddings`).

It raises only what the planner would raise for the same weights, and decides nothing it cannot decide
alone (it runs before the flow's parameters are validated, so when a run has several mistakes, missing
weights are the one reported first): a model name this open_clip does not ship a config for, weights given as URLs, and files that exist
(whether they hold valid weights) are all left to the planner.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tasks.errors import UserError
from tasks.io.locations import default_model_dir, nsfw_weights_path
from tasks.models.clip_resolve import checkpoint_for_tag, read_model_config
from tasks.models.remote_weights import is_remote


def refuse_missing_weights(clip_model: str, clip_pretrained: str, model_dir: str | None, nsfw_weights: str | None) -> None:
    """Raise the planner's UserError when the run's CLIP checkpoint or NSFW head is not on this machine."""
    if not clip_model or not clip_pretrained:
        return  # the flow's parameter check speaks first
    model_dir = model_dir or default_model_dir()
    model_name = _known_model_name(clip_model)
    if model_name is None:
        return
    if not is_remote(clip_pretrained):
        checkpoint_for_tag(model_name, clip_pretrained, model_dir)  # raises the planner's sentence
    refuse_missing_head(str(nsfw_weights or nsfw_weights_path(model_dir, model_name)))


def refuse_missing_head(head_location: str) -> None:
    """Raise the sentence of loading the NSFW head (tasks/models/nsfw.py) when its local file is not there."""
    if not is_remote(head_location) and not Path(head_location).is_file():
        raise UserError(  # also load_nsfw_head's sentence (tasks/models/nsfw.py asks here)
            f"NSFW head weights not found at {Path(head_location)}; run `nsfw-curator models fetch --model-dir DIR` "
            f"or pass --nsfw-weights with a safetensors file."
        )


def _known_model_name(clip_model: str) -> str | None:
    """The model name the planner would use, once its config is known to be valid; None when only open_clip can tell."""
    if clip_model.lower().endswith(".json"):
        config_path = Path(clip_model).expanduser().resolve()
        read_model_config(config_path)  # raises the planner's sentence for a missing or invalid config
        return config_path.stem
    model_name = clip_model.replace("/", "-")
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return None
    # open_clip's own configs are the JSON files in its package: found without importing it (and torch)
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not any((Path(location) / "model_configs" / f"{model_name}.json").is_file() for location in locations):
        return None
    return model_name
