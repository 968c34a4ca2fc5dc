"""Offset artifacts: written atomically, refused when altered or mismatched."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fakes import corrupt_last_byte

from proxy.decoding.vocab import ByteVocab
from proxy.pair.artifact import ArtifactError, load_artifact, save_artifact, weights_sha256


@pytest.fixture
def artifact(tmp_path, tiny_base, smollm2_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(tiny_base)
    base_sha = weights_sha256(base)
    vocab = ByteVocab.from_tokenizer(smollm2_tokenizer)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))
    out = save_artifact(
        tmp_path / "offset",
        peft_model,
        base_name="tiny",
        base_sha256=base_sha,
        vocab=vocab,
        alpha=1.0,
        objective="NPO",
        training={"lr": 1e-4},
        data={"forget": {"sha256": "ab" * 32, "bytes": 10, "records": 1}},
    )
    return out, base, vocab


def test_round_trip_and_no_temporary_leftovers(artifact):
    path, base, vocab = artifact
    art = load_artifact(path, base, vocab)
    assert art.manifest["objective"] == "NPO" and art.alpha == 1.0
    assert [p.name for p in path.parent.iterdir()] == ["offset"]


def test_altered_manifest_is_refused(artifact):
    path, base, vocab = artifact
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["adapter_config.json"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(path, base, vocab)


def test_altered_weights_are_refused(artifact):
    path, base, vocab = artifact
    corrupt_last_byte(path / "adapter_model.safetensors")
    with pytest.raises(ArtifactError, match="adapter_model.safetensors fails its sha256"):
        load_artifact(path, base, vocab)


def test_other_base_model_is_refused(artifact):
    path, base, vocab = artifact
    other = copy.deepcopy(base)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ArtifactError, match="base model"):
        load_artifact(path, other, vocab)


def test_existing_output_is_not_overwritten(artifact, tiny_base, smollm2_tokenizer):
    path, base, vocab = artifact
    with pytest.raises(FileExistsError):
        save_artifact(
            path, None, base_name="x", base_sha256="x", vocab=vocab, alpha=1, objective="x", training={}, data={}
        )


def test_other_tokenizer_is_refused(artifact):
    path, base, vocab = artifact
    table = list(vocab.token_bytes)
    table[1000] = b"something else"
    other = ByteVocab(table, vocab.eot_ids, vocab.tokenizer)
    with pytest.raises(ArtifactError, match="tokenizer"):
        load_artifact(path, base, other)
