"""The demo forget set that ships with the project (Harry Potter facts, which
the packaged SmolLM2-135M-Instruct demonstrably knows), a retain set of
general facts, and the training settings for the demo offset.

``python -m bench.demo_unlearning`` trains with these and measures the
result through the proxy.
"""

from __future__ import annotations

from pathlib import Path

from .train import TrainConfig

RESOURCES = Path(__file__).with_name("resources")
DEMO_FORGET = RESOURCES / "demo_forget.jsonl"
DEMO_RETAIN = RESOURCES / "demo_retain.jsonl"

#: NPO with a retain NLL term (open-unlearning's NPO+GD).
DEMO = TrainConfig(
    forget=str(DEMO_FORGET),
    retain=str(DEMO_RETAIN),
    out="",
    objective="NPO+GD",
    base="smollm2",
    lr=1e-3,
    epochs=6,
    batch_size=4,
)
