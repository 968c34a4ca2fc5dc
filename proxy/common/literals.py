"""The closed sets of strings that settings and results take, as ``Literal`` types (mypy checks
every use; pydantic validates config files against the same types)."""

from __future__ import annotations

from typing import Any, Literal, get_args

ClientAlpha = Literal["at_least", "any", "none"]
"""What a request's ``offset_alpha`` may do: raise α and never lower it (``at_least``, the
default everywhere), set any α (``any``, which lets a client switch unlearning off), or
nothing (``none``)."""

DecodingMode = Literal["token", "guided", "sequence"]
"""Token by token over the remote's top-k logprobs; the remote's drafts with B standing in for
its logprobs where the offset is in scope; or whole samples re-ranked by ΣΔ."""

ScopeAction = Literal["refuse", "mask", "rewrite"]
"""Sequence mode's answer when every sample is in forget scope: the refusal text, the best
sample with its in-scope spans masked, or the best sample up to its first in-scope span and
the rest written by the local pair under the offset."""

ScopeRule = Literal["step", "token", "choice"]
"""How the scope threshold τ leaves the offset out of scope (:mod:`proxy.decoding.offset`): per
step, by the step's expected offset (``step``); per candidate, by its own offset (``token``);
or per candidate except where the remote's own choice is lowered by τ, which takes the whole
offset (``choice``)."""

Prefill = Literal["llama.cpp", "vllm", "deepseek", "none"]
"""How an OpenAI-chat upstream continues a partial assistant message (``none``: it cannot)."""

TrainMode = Literal["proxy", "exact", "remote"]
"""Where an offset's training target comes from: the pair alone (``proxy``), an in-process
remote model R (``exact``), or a vLLM server's ``prompt_logprobs`` (``remote``)."""

ObjectiveName = Literal["GradAscent", "GradDiff", "KL", "NPO", "NPO+GD", "NPO+KL", "SimNPO", "DPO"]
"""The unlearning objectives (open-unlearning's names; :data:`proxy.training.objectives.OBJECTIVES`)."""

Parameters = Literal["lora", "full"]
"""What U trains: a LoRA adapter on B, or all of its weights."""

RetainPositions = Literal["all", "answer"]
"""Where a KL retain term is averaged."""

RedactionMode = Literal["mask", "regenerate"]
"""What redaction does with a flagged output: mask its flagged spans, or write it again
through the served model."""


def values(kind: object) -> tuple[str, ...]:
    """The strings of a ``Literal`` type, in order (for messages and choices)."""
    return tuple(get_args(kind))


def choice(kind: Any, value: str, what: str) -> Any:
    """``value`` checked against the ``Literal`` type ``kind`` (for strings read at run time).

    Raises:
        ValueError: ``value`` is not one of the type's strings (the message names ``what`` and them).
    """
    if value not in values(kind):
        raise ValueError(f"{what} must be one of {', '.join(values(kind))}, not {value!r}")
    return value
