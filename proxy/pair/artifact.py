"""Offset artifacts: a folder with peft adapter weights and ``manifest.json``.

``manifest.json`` (format version 1)::

    {"format": "deltaproxy-offset", "format_version": 1,
     "parameters": "lora" | "full",                # peft adapter, or all of U's weights
     "base_model": {"name": str, "sha256": str},   # sha256 over the base weights
     "tokenizer_sha256": str,                      # ByteVocab.fingerprint()
     "alpha": float, "objective": str, "training": {...},
     "data": {"forget": {"sha256", "bytes", "records"}, "retain": {...} | null},
     "files": {"adapter_model.safetensors": sha256, ...},  # "full": model.safetensors, config.json
     "created": ISO 8601 UTC,
     "offset_threshold": float,                    # optional: τ calibrated at train time (nats)
     "offset_scope": "step" | "token" | "choice",  # optional: τ's rule (proxy.decoding.offset; "step" if absent)
     "self_check": {...},                          # optional: proxy.training.selfcheck.calibrate_and_check
     "scope_gate": {"threshold": float, ...}}      # optional: the scope gate, weights in scope_gate.safetensors

It never holds the text of the forget or retain sets. Loading refuses an
artifact whose base model or tokenizer differs from the pair's, or whose
files fail their checksums. Writing is atomic: a temporary folder in the same
parent, renamed into place.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

import numpy as np
import torch

from proxy.common.files import new_dir_beside
from proxy.common.literals import Parameters, ScopeRule, choice, values
from proxy.decoding.scope_gate import GATE_FILE, ScopeGate
from proxy.decoding.vocab import ByteVocab
from proxy.pair.model_files import file_sha256

FORMAT = "deltaproxy-offset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMETERS = values(Parameters)
"""What an artifact holds: a peft adapter on B, or all of U's weights."""


class BaseModel(TypedDict):
    """The base model B an offset was trained on."""

    name: str
    sha256: str
    """sha256 over B's weights (:func:`weights_sha256`)."""


class Manifest(TypedDict):
    """``manifest.json`` (format version 1; the module docstring shows one)."""

    format: str
    format_version: int
    parameters: Parameters
    base_model: BaseModel
    tokenizer_sha256: str
    """:meth:`proxy.decoding.vocab.ByteVocab.fingerprint` of the pair's tokenizer."""
    alpha: float
    objective: str
    training: dict[str, Any]
    """The training settings (:meth:`proxy.training.config.TrainConfig.settings`)."""
    data: dict[str, Any]
    """sha256, size and record count of each training set; never their text."""
    files: dict[str, str]
    """Each file of the artifact and its sha256."""
    created: str
    """ISO 8601, UTC."""
    offset_threshold: NotRequired[float]
    """τ calibrated at train time (nats)."""
    offset_scope: NotRequired[str]
    """The rule τ was calibrated for (:data:`proxy.common.literals.ScopeRule`; ``"step"`` when absent)."""
    self_check: NotRequired[dict[str, Any]]
    """:func:`proxy.training.selfcheck.calibrate_and_check`'s report."""
    scope_gate: NotRequired[dict[str, Any]]
    """The scope gate's record (:func:`proxy.training.scope_gate.fit_scope_gate`): θ, counts,
    training accuracy; its weights are ``scope_gate.safetensors``."""


class ArtifactError(ValueError):
    """An offset artifact that cannot be served with this pair."""


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model`` (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class OffsetArtifact:
    path: Path
    manifest: Manifest
    sha256: str
    """sha256 of ``manifest.json``, which pins every file: the artifact's identity."""

    @property
    def alpha(self) -> float:
        return float(self.manifest.get("alpha", 1.0))

    @property
    def offset_threshold(self) -> float | None:
        """τ calibrated at train time (nats), or None for an artifact trained without it."""
        value = self.manifest.get("offset_threshold")
        return None if value is None else float(value)

    @property
    def offset_scope(self) -> ScopeRule:
        """The rule its τ was calibrated for: ``"step"`` for an artifact trained before the rule
        was recorded.

        Raises:
            ValueError: a manifest with an unknown rule.
        """
        return cast(ScopeRule, choice(ScopeRule, str(self.manifest.get("offset_scope", "step")), "offset_scope"))

    def scope_gate(self) -> ScopeGate | None:
        """The offset's scope gate (:mod:`proxy.decoding.scope_gate`), or None for an offset
        trained without one.

        Raises:
            ArtifactError: the manifest names a gate whose file is missing or malformed.
        """
        record = self.manifest.get("scope_gate")
        if record is None:
            return None
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(self.path / GATE_FILE))
            return ScopeGate(
                np.asarray(tensors["weight"], dtype=np.float32),
                float(tensors["bias"].reshape(())),
                float(record["threshold"]),
            )
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"offset artifact {self.path}: bad scope gate ({exc})") from exc

    @property
    def parameters(self) -> str:
        """``"lora"`` (a peft adapter on B's weights) or ``"full"`` (all of U's weights)."""
        return str(self.manifest.get("parameters", "lora"))

    def attach(self, model: torch.nn.Module) -> Any:
        """``model`` wrapped as a ``PeftModel`` with this adapter (U); B is
        the same model under ``disable_adapter()``. LoRA artifacts only."""
        from peft import PeftModel

        if self.parameters != "lora":
            raise ArtifactError(f"offset artifact {self.path} holds full weights, not an adapter")
        return PeftModel.from_pretrained(model, str(self.path), is_trainable=False)

    def load_full(self) -> Any:
        """U as a separate float32 model (full fine-tuning artifacts only)."""
        from transformers import AutoModelForCausalLM

        if self.parameters != "full":
            raise ArtifactError(f"offset artifact {self.path} holds an adapter, not full weights")
        return AutoModelForCausalLM.from_pretrained(str(self.path), dtype=torch.float32).eval()


def load_artifact(path: Path, base: torch.nn.Module, vocab: ByteVocab) -> OffsetArtifact:
    """Read and verify an artifact against the pair's base model and tokenizer.

    Raises:
        FileNotFoundError: no such folder or no manifest.
        ArtifactError: wrong format, base model, tokenizer, or a checksum mismatch.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"offset artifact not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"offset artifact {path} has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"offset artifact {path}: {MANIFEST} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"offset artifact {path}: not a {FORMAT} manifest")
    if manifest.get("parameters", "lora") not in PARAMETERS:
        raise ArtifactError(f"offset artifact {path}: unknown parameters kind {manifest.get('parameters')!r}")
    if manifest.get("offset_scope", "step") not in values(ScopeRule):
        raise ArtifactError(f"offset artifact {path}: unknown offset_scope {manifest.get('offset_scope')!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"offset artifact {path}: format_version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"offset artifact {path}: manifest lists no files")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"offset artifact {path}: file {name} is missing")
        if file_sha256(f) != digest:
            raise ArtifactError(f"offset artifact {path}: file {name} fails its sha256 checksum (altered or corrupt)")
    tok = vocab.fingerprint()
    if manifest.get("tokenizer_sha256") != tok:
        raise ArtifactError(
            f"offset artifact {path} was trained for tokenizer {str(manifest.get('tokenizer_sha256'))[:12]}…, "
            f"the pair's tokenizer is {tok[:12]}…"
        )
    base_sha = weights_sha256(base)
    want = (manifest.get("base_model") or {}).get("sha256")
    if want != base_sha:
        raise ArtifactError(
            f"offset artifact {path} was trained on base model {str(want)[:12]}…, the pair's base model is {base_sha[:12]}…"
        )
    return OffsetArtifact(path, cast(Manifest, manifest), file_sha256(manifest_path))


def save_artifact(
    out: Path,
    model: Any,
    *,
    base_name: str,
    base_sha256: str,
    vocab: ByteVocab,
    alpha: float,
    objective: str,
    training: Mapping[str, Any],
    data: Mapping[str, Any],
    parameters: str = "lora",
    extra: Mapping[str, Any] | None = None,
    gate: ScopeGate | None = None,
) -> Path:
    """Write an artifact atomically (temporary folder, then rename).

    ``model`` is a peft model (``parameters="lora"``: the adapter is saved) or
    U itself (``parameters="full"``: all weights, safetensors).

    ``data`` holds hashes and sizes of the training sets, never their text; ``extra``
    adds top-level keys (training's ``offset_threshold``, ``self_check`` and ``scope_gate``);
    ``gate`` is written to ``scope_gate.safetensors`` (``extra`` then holds its record).

    Raises:
        FileExistsError: ``out`` exists.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    tmp = new_dir_beside(out)
    try:
        if parameters not in PARAMETERS:
            raise ValueError(f"parameters must be one of {PARAMETERS}, not {parameters!r}")
        model.save_pretrained(str(tmp))
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model card repeats nothing useful
        if gate is not None:
            from safetensors.numpy import save_file

            if not extra or "scope_gate" not in extra:
                raise ValueError("a scope gate is saved with its record (extra['scope_gate'])")
            save_file(
                {"weight": gate.weight.astype(np.float32), "bias": np.array([gate.bias], dtype=np.float32)},
                str(tmp / GATE_FILE),
            )
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "parameters": parameters,
            "base_model": {"name": base_name, "sha256": base_sha256},
            "tokenizer_sha256": vocab.fingerprint(),
            "alpha": float(alpha),
            "objective": objective,
            "training": dict(training),
            "data": dict(data),
            "files": files,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
