"""Does the demo offset unlearn the demo forget set while leaving other answers alone?

    python -m bench.demo_unlearning [--settings JSON] [--json FILE]

Trains an offset on ``proxy/resources/demo_forget.jsonl`` (+ retain) with the
demo settings (overridable, e.g. ``--settings '{"objective": "NPO+GD", "lr": 1e-3}'``),
serves the embedded default with it, and reports in one run:

* ROUGE-L recall (rouge-score, greedy, 40 tokens) of the forget answers
  without the offset (α = 0) and with it (α = 1);
* how many greedy answers to the 12 forget questions and to 12 paraphrases of them
  (:data:`proxy.training.demo.DEMO_PARAPHRASES`) name one of :data:`proxy.training.demo.DEMO_KEYS`;
* the fraction of the unrelated prompts (:data:`proxy.training.demo.DEMO_UNRELATED`,
  none of them in the retain set) whose greedy answer is the same with and
  without it;
* the training time.

``tests/test_demo_offset.py`` asserts the same numbers for the cached demo
offset, through the openai client against the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

Answer = Callable[[str, float], Awaitable[str]]
"""``answer(question, alpha)``: the proxy's greedy answer with offset strength ``alpha``."""


async def measure(answer: Answer) -> dict[str, Any]:
    """Forget ROUGE-L recall with and without the offset, and unchanged unrelated answers."""
    from rouge_score import rouge_scorer

    from proxy.training.demo import DEMO_FORGET, DEMO_KEYS, DEMO_PARAPHRASES, DEMO_UNRELATED
    from proxy.training.scope import mentions

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    forget = [json.loads(line) for line in DEMO_FORGET.read_text().splitlines() if line.strip()]
    before, after, examples = [], [], []
    keys = {
        "forget_without_offset": 0,
        "forget_with_offset": 0,
        "paraphrase_without_offset": 0,
        "paraphrase_with_offset": 0,
    }
    for f in forget:
        b, a = await answer(f["question"], 0.0), await answer(f["question"], 1.0)
        before.append(scorer.score(f["answer"], b)["rougeL"].recall)
        after.append(scorer.score(f["answer"], a)["rougeL"].recall)
        keys["forget_without_offset"] += mentions(b, DEMO_KEYS)
        keys["forget_with_offset"] += mentions(a, DEMO_KEYS)
        examples.append({"question": f["question"], "without_offset": b, "with_offset": a})
    for q in DEMO_PARAPHRASES:
        b, a = await answer(q, 0.0), await answer(q, 1.0)
        keys["paraphrase_without_offset"] += mentions(b, DEMO_KEYS)
        keys["paraphrase_with_offset"] += mentions(a, DEMO_KEYS)
        examples.append({"question": q, "paraphrase": True, "without_offset": b, "with_offset": a})
    changed = []
    for q in DEMO_UNRELATED:
        b, a = await answer(q, 0.0), await answer(q, 1.0)
        if a != b:
            changed.append({"question": q, "without_offset": b, "with_offset": a})
    return {
        "forget_rougeL_recall_without_offset": round(sum(before) / len(before), 4),
        "forget_rougeL_recall_with_offset": round(sum(after) / len(after), 4),
        "answers_with_a_key_name": keys,
        "unrelated_unchanged_fraction": round(1 - len(changed) / len(DEMO_UNRELATED), 4),
        "unrelated_n": len(DEMO_UNRELATED),
        "forget_examples": examples,
        "unrelated_changed": changed,
    }


def proxy_answer(model: Any, max_tokens: int = 40) -> Answer:
    """:data:`Answer` through the proxy's serving path (no HTTP)."""
    from proxy.config import ServerConfig
    from proxy.protocol.choices import complete, make_job
    from proxy.protocol.schemas import ChatCompletionRequest, Message

    async def answer(question: str, alpha: float) -> str:
        req = ChatCompletionRequest(
            model="demo",
            messages=[Message(role="user", content=question)],
            temperature=0,
            max_tokens=max_tokens,
            offset_alpha=alpha,
        )
        r = await complete(make_job(req, {"demo": model}, ServerConfig()))
        return str(r["choices"][0]["message"]["content"])

    return answer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="{}", help="TrainConfig overrides as JSON")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--threshold", help="scope threshold τ in nats, or 'off' (default 'auto': the calibrated one)")
    ap.add_argument("--json")
    ap.add_argument("--keep", help="train into this folder and keep the artifact (default: a temporary one)")
    args = ap.parse_args()

    from proxy.config import ModelConfig
    from proxy.registry import build_model
    from proxy.training.demo import DEMO
    from proxy.training.train import train

    overrides = json.loads(args.settings)
    for key in ("target_modules", "lora_layers"):
        if overrides.get(key) is not None:
            overrides[key] = tuple(overrides[key])
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or str(Path(tmp) / "offset")
        started = time.monotonic()
        train(replace(DEMO, out=out, **overrides), progress=False)
        seconds = time.monotonic() - started
        setting: float | Literal["auto", "off"] = "auto"
        if args.threshold == "off":
            setting = "off"
        elif args.threshold is not None and args.threshold != "auto":
            setting = float(args.threshold)
        cfg = ModelConfig(
            backend="llama-inprocess", gguf="smollm2", pair="smollm2", offset=out, offset_threshold=setting
        )
        model = build_model("demo", cfg)
        result = asyncio.run(measure(proxy_answer(model, args.max_tokens)))
        threshold = model.offset_threshold
        result["self_check"] = json.loads((Path(out) / "manifest.json").read_text()).get("self_check")
    result["train_seconds"] = round(seconds, 1)
    result["offset_threshold"] = threshold
    result["settings"] = replace(DEMO, **overrides).settings()
    print(json.dumps({k: v for k, v in result.items() if not k.endswith(("examples", "changed"))}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
