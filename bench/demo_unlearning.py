"""Does the demo offset unlearn the demo forget set while leaving other answers alone?

    python -m bench.demo_unlearning [--settings JSON] [--json FILE]

Trains an offset on ``proxy/resources/demo_forget.jsonl`` (+ retain) with the
demo settings (overridable, e.g. ``--settings '{"objective": "NPO+KL", "lr": 5e-4}'``),
serves the embedded default with it, and reports in one run:

* ROUGE-L recall (rouge-score, greedy, 40 tokens) of the forget answers
  without the offset (α = 0) and with it (α = 1);
* how many of 12 unrelated prompts give the same greedy answer with and without it;
* the training time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

UNRELATED = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "What is 12 times 7?",
    "Name a famous physicist.",
    "Give me one tip for sleeping better.",
    "What is photosynthesis?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
    "What is the chemical symbol for gold?",
    "Who wrote Pride and Prejudice?",
    "What is the largest ocean on Earth?",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="{}", help="TrainConfig overrides as JSON")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args()
    from rouge_score import rouge_scorer

    from proxy.config import ModelConfig, ServerConfig
    from proxy.demo import DEMO, DEMO_FORGET
    from proxy.protocol import ChatCompletionRequest
    from proxy.registry import build_model
    from proxy.serving import complete, make_job
    from proxy.train import train

    overrides = json.loads(args.settings)
    if "target_modules" in overrides:
        overrides["target_modules"] = tuple(overrides["target_modules"])
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "offset")
        started = time.monotonic()
        train(replace(DEMO, out=out, **overrides), progress=False)
        seconds = time.monotonic() - started
        model = build_model("demo", ModelConfig(backend="llama-inprocess", gguf="smollm2", pair="smollm2", offset=out))
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        forget = [json.loads(line) for line in DEMO_FORGET.read_text().splitlines() if line.strip()]

        async def answer(question: str, alpha: float) -> str:
            req = ChatCompletionRequest(
                model="demo",
                messages=[{"role": "user", "content": question}],
                temperature=0,
                max_tokens=args.max_tokens,
                offset_alpha=alpha,
            )
            r = await complete(make_job(req, {"demo": model}, ServerConfig()))
            return r["choices"][0]["message"]["content"]

        async def run() -> dict[str, float]:
            before, after = [], []
            for f in forget:
                before.append(scorer.score(f["answer"], await answer(f["question"], 0.0))["rougeL"].recall)
                after.append(scorer.score(f["answer"], await answer(f["question"], 1.0))["rougeL"].recall)
            same = [await answer(q, 0.0) == await answer(q, 1.0) for q in UNRELATED]
            return {
                "forget_rougeL_recall_without_offset": sum(before) / len(before),
                "forget_rougeL_recall_with_offset": sum(after) / len(after),
                "unrelated_unchanged_fraction": sum(same) / len(same),
                "train_seconds": round(seconds, 1),
            }

        result = asyncio.run(run())
    result["settings"] = {**{k: v for k, v in overrides.items()}}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
