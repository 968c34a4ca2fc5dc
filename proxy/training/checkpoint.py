"""What a training run keeps between runs: its checkpoint (``<out>.ckpt``, the trainable
weights, optimizer and scheduler state and the step, written atomically; a resumed run
ends with the same weights as an uninterrupted one) and the cache key of the offset it
trains (:func:`offset_key`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from proxy.common.files import atomic_file
from proxy.pair.model_files import local_model_dir
from proxy.training.config import TrainConfig
from proxy.training.scope import ENTITIES, GENERAL_FILES


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, step: int) -> None:
    """Write the trainable weights, ``optimizer``'s and ``scheduler``'s state and ``step`` to ``path`` atomically."""
    state = {
        "step": step,
        "weights": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    """Restore what :func:`save_checkpoint` wrote to ``path`` into ``model``, ``optimizer``
    and ``scheduler``; the optimizer steps it had taken."""
    state = torch.load(path, weights_only=False)
    with torch.no_grad():
        named = dict(model.named_parameters())
        for n, t in state["weights"].items():
            named[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def offset_key(cfg: TrainConfig) -> str:
    """What an offset trained with ``cfg`` depends on, for caching it: the
    settings, the data files' bytes and the base model's folder name (16 hex digits)."""
    h = hashlib.sha256(json.dumps(cfg.settings(), sort_keys=True).encode())
    for path in (cfg.forget, cfg.retain):
        h.update(Path(path).read_bytes() if path else b"-")
    if cfg.general_retain or cfg.calibrate or cfg.neighbours:
        for f in (*GENERAL_FILES.values(), ENTITIES):
            h.update(f.read_bytes())
    h.update(local_model_dir(cfg.base).name.encode())
    return h.hexdigest()[:16]
