"""Redaction (issue 7): teacher-forced offsets per token, spans at word
boundaries, mask and regenerate modes, calibration, resumable runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_pair
from fakes import FakeRemote, script

from proxy.decoding.served import ServedModel
from proxy.redaction.redact import redact_file
from proxy.redaction.scoring import Item, RedactError, Scored, parse_item, score
from proxy.redaction.spans import calibrate, capitalised_phrases, flag_spans, flagged_fraction, mask


def _scored(text: str, words_delta: list[float]) -> Scored:
    """One 'token' per whitespace-separated word (with its leading space)."""
    spans, pos = [], 0
    for w in text.split(" "):
        start = pos if not spans else pos - 1  # the leading space belongs to the token
        pos += len(w) + 1
        spans.append((start, pos - 1))
    return Scored(np.array(spans), np.array(words_delta, dtype=float))


def test_token_logprobs_are_the_pair_models_teacher_forced(tiny_base, smollm2_tokenizer):
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    prompt = pair.prompt_ids([{"role": "user", "content": "Who is it?"}])
    ids = smollm2_tokenizer.encode(" Ron Weasley, of course.", add_special_tokens=False)
    log_u, log_b = pair.token_logprobs(prompt, ids)
    full = torch.tensor([prompt + ids])
    with torch.no_grad():
        u = torch.log_softmax(pair.model(full).logits[0].float(), -1)
        with pair.model.disable_adapter():
            b = torch.log_softmax(pair.model(full).logits[0].float(), -1)
    n = len(prompt)
    want_u = [u[n - 1 + i, t].item() for i, t in enumerate(ids)]
    want_b = [b[n - 1 + i, t].item() for i, t in enumerate(ids)]
    np.testing.assert_allclose(log_u, want_u, atol=1e-5)
    np.testing.assert_allclose(log_b, want_b, atol=1e-5)
    assert np.abs(log_u - log_b).max() > 0.01  # the random offset is not zero
    with pytest.raises(ValueError, match="context"):
        pair.token_logprobs(prompt, [0] * 600)


def test_spans_cover_whole_words_and_merge():
    text = "His friend is Ron Weasley and Hogwarts is far"
    # tokens: His friend is Ron Weasley and Hogwarts is far
    sc = _scored(text, [0, 0, 0, -5, -6, 0, -4, 0, 0])
    spans = flag_spans(text, sc, 3.0)
    assert [s["text"] for s in spans] == ["Ron Weasley", "Hogwarts"]
    assert spans[0]["min_offset"] == -6 and spans[0]["mean_offset"] == -5.5
    assert mask(text, spans) == "His friend is [REDACTED] and [REDACTED] is far"
    assert flag_spans(text, sc, 6.5) == []
    # a sub-word token widens to its word
    sub = Scored(np.array([[0, 3], [3, 7], [7, 12]]), np.array([0.0, -9.0, 0.0]))
    assert [s["text"] for s in flag_spans("Hogwarts rules", sub, 1.0)] == ["Hogwarts"]


def test_spans_widen_to_the_whole_name_or_title_they_fall_in():
    text = (
        "In 1944 she wrote The Lantern of November and won the Kestrel Award for Storytelling and the Blue Heron Medal"
    )
    words = text.split(" ")
    delta = [0.0] * len(words)
    delta[words.index("November")] = -5.0  # only the title's distinctive word
    delta[words.index("Storytelling")] = -5.0
    spans = flag_spans(text, _scored(text, delta), 3.0)
    # the whole title and the whole award (joined by "of", "for"), not the next award after "and the"
    assert [s["text"] for s in spans] == ["The Lantern of November", "Kestrel Award for Storytelling"]
    assert [s["text"] for s in flag_spans(text, _scored(text, delta), 3.0, phrases=False)] == [
        "November",
        "Storytelling",
    ]
    # a lower-case word is not widened; a phrase never starts or ends with a connector
    title = "the book of the Year of Snow of"
    assert [title[a:b] for a, b in capitalised_phrases(title)] == ["Year of Snow"]
    assert capitalised_phrases("Ron and Hermione went to Hogwarts") == []


def test_calibrate_picks_the_smallest_threshold_within_the_target():
    rng = np.random.default_rng(0)
    texts, scores = [], []
    for _ in range(20):
        words = [f"w{i}" for i in range(30)]
        text = " ".join(words)
        texts.append(text)
        scores.append(_scored(text, list(-np.abs(rng.normal(0, 2, 30)))))
    t, fpr = calibrate(texts, scores, 0.05)
    assert fpr <= 0.05
    assert flagged_fraction(texts, scores, t - 1e-6) > 0.05  # any smaller T flags too much
    t0, fpr0 = calibrate(texts, scores, 0.0)
    assert fpr0 == 0.0 and t0 >= t
    with pytest.raises(RedactError):
        calibrate(texts, scores, 1.5)


def test_excluded_characters_count_neither_as_flagged_nor_in_the_total():
    """A retain output that repeats forget-set content: those characters are left out of
    the false-positive rate (by hand: 'ab cd ef', 'cd' flagged, 'ef' excluded)."""
    text = "ab cd ef"
    sc = _scored(text, [0.0, -3.0, 0.0])
    assert flagged_fraction([text], [sc], 1.0) == pytest.approx(2 / 8)
    assert flagged_fraction([text], [sc], 1.0, [[(6, 8)]]) == pytest.approx(2 / 6)
    assert flagged_fraction([text], [sc], 1.0, [[(3, 5)]]) == 0.0  # the flagged word itself excluded
    t, fpr = calibrate([text], [sc], 0.0, [[(2, 5)]])
    assert fpr == 0.0 and t == 0.0  # with 'cd' excluded, even T = 0 flags no counted character


def _model(pair, words=("Ron", " Weasley", ".")):
    return ServedModel("m", FakeRemote(script(list(words))), pair=pair, alpha=1.0, offset_threshold=None)


async def test_redact_file_masks_resumes_and_answers_bad_lines(tmp_path: Path, tiny_base, smollm2_tokenizer):
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    model = _model(pair)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "Who?"}], "output": "It is Ron Weasley, of course."},
        {"id": "b", "prompt": "Facts:", "output": "The sky is blue."},
        {"id": "c", "output": "no prompt"},
        {"id": "a", "prompt": "again", "output": "x"},
    ]
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    scores = [score(pair, item) for item in _items(rows[:2])]
    threshold = float(np.sort(-scores[0].delta)[-2])  # flags the two most negative tokens of "a"
    counts = await redact_file(model, inp, out, threshold=threshold, progress=False)
    assert counts["total"] == 5 and counts["failed"] == 3
    lines = {(o["id"], (o.get("error") or {}).get("line")): o for o in map(json.loads, out.read_text().splitlines())}
    a = lines[("a", None)]
    assert a["spans"] and "[REDACTED]" in a["output"] and a["threshold"] == threshold
    for s in a["spans"]:
        assert rows[0]["output"][s["start"] : s["end"]] == s["text"] and s["min_offset"] < -threshold
    assert lines[("c", 3)]["error"]["code"] == "invalid_request"
    assert lines[("a", 4)]["error"]["code"] == "duplicate_id"
    assert lines[(None, 5)]["error"]["code"] == "invalid_json"
    before = out.read_bytes()
    again = await redact_file(model, inp, out, threshold=threshold, progress=False)
    assert again["skipped"] == 5 and out.read_bytes() == before
    with pytest.raises(RedactError, match="another input"):
        other = tmp_path / "other.jsonl"
        other.write_text(json.dumps(rows[1]) + "\n")
        await redact_file(model, other, out, threshold=threshold, progress=False)


async def test_regenerate_keeps_the_text_before_the_first_span(tmp_path: Path, tiny_base, smollm2_tokenizer):
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    model = _model(pair, words=(" someone", " else."))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    row = {"id": "a", "messages": [{"role": "user", "content": "Who?"}], "output": "It is Ron Weasley, of course."}
    inp.write_text(json.dumps(row) + "\n")
    (sc,) = [score(pair, i) for i in _items([row])]
    threshold = float(-sc.delta.min()) - 1e-6  # flags exactly the most negative token
    await redact_file(model, inp, out, threshold=threshold, mode="regenerate", progress=False)
    line = json.loads(out.read_text())
    first = line["spans"][0]["start"]
    assert line["output"].startswith(row["output"][:first])
    assert line["output"][first:] == " someone else."[: len(line["output"]) - first]
    ctx = model.adapter.contexts[0]
    assert ctx.assistant_prefix == row["output"][:first].encode()  # the remote continued the kept text


async def test_a_model_without_offset_is_refused(tmp_path: Path, tiny_base, smollm2_tokenizer):
    model = ServedModel("m", FakeRemote(script(["x"])))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "p", "output": "o"}) + "\n")
    with pytest.raises(RedactError, match="no offset"):
        await redact_file(model, inp, tmp_path / "out.jsonl", threshold=1.0, progress=False)
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(RedactError, match="threshold"):
        await redact_file(_model(make_tiny_pair(tiny_base, smollm2_tokenizer)), inp, tmp_path / "o", threshold=-1)


def _items(rows):
    items = [parse_item(i + 1, json.dumps(r).encode()) for i, r in enumerate(rows)]
    assert all(isinstance(i, Item) for i in items)
    return items
