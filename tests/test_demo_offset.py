"""The demo offset that the README's run command serves (trained once from the
shipped forget set, then cached), measured through the official openai client
against our server: greedy answers to the forget questions lose their facts,
unrelated prompts keep their answers (issue 3, "Must show")."""

from __future__ import annotations

import json

import openai
import pytest
from aiohttp.test_utils import TestServer

from bench.demo_unlearning import measure
from proxy.config import DEFAULT_MODEL, embedded_default
from proxy.registry import build_models
from proxy.server.app import create_app
from proxy.training.demo import DEMO, DEMO_FORGET, DEMO_PARAPHRASES, DEMO_UNRELATED, demo_offset, demo_offset_key
from proxy.training.scope import GENERAL_FILES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first run trains the offset (minutes)


def _questions(path) -> set[str]:
    return {json.loads(line)["question"] for line in open(path) if line.strip()}


def test_unrelated_prompts_are_not_training_data():
    trained = set().union(*(_questions(f) for f in GENERAL_FILES.values()))
    assert not set(DEMO_UNRELATED) & (trained | _questions(DEMO_FORGET))
    assert len(DEMO_PARAPHRASES) == 12 and not set(DEMO_PARAPHRASES) & (trained | _questions(DEMO_FORGET))


def test_no_demo_question_gives_a_key_name_away():
    """A question that names a key (``Who is the headmaster of Hogwarts?``) cannot measure
    whether an answer reveals it: an echo of the question would count as a leak."""
    from proxy.training.demo import DEMO_KEYS
    from proxy.training.scope import mentions

    questions = [*_questions(DEMO_FORGET), *DEMO_PARAPHRASES, *DEMO_UNRELATED]
    assert not [q for q in questions if mentions(q, DEMO_KEYS)]


def test_a_failed_demo_training_is_a_clear_error_and_leaves_no_artifact(tmp_path, monkeypatch):
    # Training runs in a child process (so the server never holds training's memory); its
    # failure must reach the caller as an error, not as a missing or half-written offset.
    monkeypatch.setenv("DELTAPROXY_CACHE", str(tmp_path))
    out = tmp_path / "offsets" / f"demo-{demo_offset_key()}"
    out.parent.mkdir(parents=True)
    out.write_text("in the way")  # the child's train() refuses to write over it
    with pytest.raises(RuntimeError, match=r"training the demo offset failed \(exit status 1"):
        demo_offset(progress=False)
    assert out.read_text() == "in the way"


async def test_demo_offset_forgets_the_forget_set_and_leaves_unrelated_answers():
    path = demo_offset(progress=False)
    assert demo_offset(progress=False) == path  # cached: the second call does not train
    config = embedded_default(offset=str(path))  # what `make run` serves: τ from the manifest
    server = TestServer(create_app(build_models(config)))
    await server.start_server()
    oa = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="none", max_retries=0)

    async def answer(question: str, alpha: float) -> str:
        r = await oa.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=40,
            extra_body={"offset_alpha": alpha},
        )
        return r.choices[0].message.content or ""

    try:
        r = await measure(answer)
    finally:
        await oa.close()
        await server.close()
    print(json.dumps(r, indent=1))
    # Measured: 0.365 -> 0.107 ROUGE-L recall, 12 of 12 unrelated answers unchanged (the targets:
    # below 0.3, and at least 11 of 12).
    assert r["forget_rougeL_recall_without_offset"] > 0.3  # the remote knows the facts
    assert r["forget_rougeL_recall_with_offset"] < 0.3
    assert r["forget_rougeL_recall_with_offset"] < r["forget_rougeL_recall_without_offset"] - 0.05
    assert r["unrelated_unchanged_fraction"] >= 11 / 12


def test_demo_offset_redacts_forget_facts_at_a_calibrated_false_positive_rate():
    """Redaction with the demo offset: T calibrated for ≤ 5% flagged characters on the
    retain set's outputs (the base model's own answers), then the forget facts, stated
    in words the training data does not use, are masked."""
    from proxy.pair.local import LocalPair
    from proxy.redaction.scoring import Item, score
    from proxy.redaction.spans import calibrate, flag_spans

    pair = LocalPair.load(DEMO.base, demo_offset(progress=False))
    retain = [json.loads(line) for line in open(GENERAL_FILES["calibration"]) if line.strip()]
    texts = [r["answer"] for r in retain]
    scores = [score(pair, Item(0, "r", r["answer"], [{"role": "user", "content": r["question"]}])) for r in retain]
    threshold, fpr = calibrate(texts, scores, 0.05)
    covered = total = 0
    for f in (json.loads(line) for line in open(DEMO_FORGET) if line.strip()):
        fact = f["answer"].rstrip(".")
        text = f"Sure! That would be {fact}, as far as I know."
        spans = flag_spans(
            text, score(pair, Item(0, "f", text, [{"role": "user", "content": f["question"]}])), threshold
        )
        start = text.index(fact)
        covered += sum(max(0, min(start + len(fact), s["end"]) - max(start, s["start"])) for s in spans)
        total += len(fact)
    recall = covered / total
    print(f"T = {threshold:.3f} nats, retain characters flagged {fpr:.4f}, forget fact characters flagged {recall:.3f}")
    assert fpr <= 0.05
    assert recall >= 0.7  # measured 0.934 at T = 0.45 nats
