"""The audit (issue 4): the in-process transformers remote, scoring under q,
the report files, policies, resuming, and the CLI's exit statuses."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_pair

import proxy.evaluation.summary as summary_module
from adapters.base import Context
from adapters.transformers_inprocess import TransformersInProcessAdapter
from bench import tofu_lite
from proxy.decoding.served import ServedModel
from proxy.evaluation.items import AuditError, AuditSettings, load_items, load_policy, load_reference
from proxy.evaluation.report import render_html
from proxy.evaluation.run import run_audit
from proxy.evaluation.scoring import QScorer
from proxy.evaluation.summary import evaluate_item

Q = "Where was Velokro Raidyr born?"


@pytest.fixture(scope="module")
def adapter(remote_dir) -> TransformersInProcessAdapter:
    return TransformersInProcessAdapter(name="remote", model_dir=remote_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tofu_lite.write(tmp_path_factory.mktemp("tofu") / "d", n_authors=2, seed=0)


def _direct(adapter: TransformersInProcessAdapter, question: str, text: str) -> tuple[list[int], np.ndarray]:
    prompt = adapter.prompt_tokens(Context(messages=({"role": "user", "content": question},)))
    ids = adapter.tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        logits = adapter.model(torch.tensor([prompt + ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1).numpy()
    return ids, lp[len(prompt) - 1 : -1]


def test_transformers_adapter_scores_and_drafts(adapter):
    ids, lp = adapter.full_logprobs(Context(messages=({"role": "user", "content": Q},)), " in Lisbon.")
    want_ids, want = _direct(adapter, Q, " in Lisbon.")
    assert ids == want_ids and lp.shape == (len(ids), adapter.n_vocab)
    np.testing.assert_allclose(lp, want, atol=1e-6)
    ctx = Context(messages=({"role": "user", "content": Q},))
    first = __import__("asyncio").run(adapter.draft(ctx, n_tokens=1, top_k=5))
    (pos,) = first.positions
    assert [c.logprob for c in pos.candidates] == sorted((c.logprob for c in pos.candidates), reverse=True)
    prompt = adapter.prompt_tokens(ctx)
    with torch.no_grad():
        nxt = torch.log_softmax(adapter.model(torch.tensor([prompt])).logits[0, -1].double(), -1).numpy()
    assert pos.candidates[0].token_id == int(np.argmax(nxt))
    assert pos.candidates[0].logprob == pytest.approx(float(nxt.max()), abs=1e-6)
    # continuing with token ids reuses the KV cache and gives the same numbers as a fresh forward
    t = pos.candidates[0].token_id
    again = __import__("asyncio").run(
        adapter.draft(Context(messages=ctx.messages, token_ids=(t,)), n_tokens=1, top_k=3)
    )
    with torch.no_grad():
        fresh = torch.log_softmax(adapter.model(torch.tensor([prompt + [t]])).logits[0, -1].double(), -1).numpy()
    assert again.positions[0].candidates[0].logprob == pytest.approx(float(fresh.max()), abs=1e-5)
    # interleaved with another request and a scoring call (caches cropped and reused): same numbers
    run = __import__("asyncio").run
    run(adapter.draft(Context(messages=({"role": "user", "content": "Hello?"},)), n_tokens=2, top_k=3))
    np.testing.assert_allclose(adapter.full_logprobs(ctx, " in Lisbon.")[1], want, atol=1e-5)
    third = run(adapter.draft(Context(messages=ctx.messages, token_ids=(t,)), n_tokens=1, top_k=3))
    assert third.positions[0].candidates[0].logprob == pytest.approx(float(fresh.max()), abs=1e-5)


async def test_q_scorer_is_the_combined_distribution(adapter, tiny_base, smollm2_tokenizer):
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    model = ServedModel(name="m", adapter=adapter, pair=pair, alpha=1.5, same_tokenizer=True)
    scorer = QScorer(model)
    assert scorer.possible
    got = await scorer.logprobs(Q, " in Lisbon.")
    ids, lr = _direct(adapter, Q, " in Lisbon.")
    lu, lb = pair.full_logprobs(pair.prompt_ids([{"role": "user", "content": Q}]), ids)
    z = lr + 1.5 * (lu - lb)
    want = (z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(len(ids)), ids]
    np.testing.assert_allclose(got, want, atol=1e-6)
    plain = await QScorer(ServedModel(name="m0", adapter=adapter, pair=pair, alpha=0.0, same_tokenizer=True)).logprobs(
        Q, " in Lisbon."
    )
    np.testing.assert_allclose(plain, lr[np.arange(len(ids)), ids], atol=1e-9)


async def test_q_scorer_with_another_tokenizer_goes_through_the_top_k(adapter, tiny_base, smollm2_tokenizer):
    """A pair whose tokenizer differs (here: told so, the general path) cannot take Δ on the
    remote's token ids over the whole vocabulary; it is scored as a vLLM remote is, over the
    remote's top-k plus the answer's token with the rest of the mass kept (Δ = 0 there).
    Checked against that formula computed by hand from a full-vocabulary forward of the
    remote and the aligner's Δ (byte-prefix probabilities, docs/concepts.md), taken step by step."""
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    model = ServedModel(name="m1", adapter=adapter, pair=pair, alpha=1.5, top_k=5, same_tokenizer=False)
    scorer = QScorer(model)
    assert scorer.possible and scorer.remote_scores and "top-5" in scorer.support
    text = " in Lisbon."
    got = await scorer.logprobs(Q, text)
    ids, lr = _direct(adapter, Q, text)
    aligner = pair.aligner(pair.prompt_ids([{"role": "user", "content": Q}]), same_tokenizer=False)
    token_bytes = adapter.token_bytes
    want = []
    for t, own in enumerate(ids):
        top = [int(i) for i in np.argsort(-lr[t], kind="stable")[:5]]
        support = top + ([own] if own not in top else [])
        delta = aligner.deltas([token_bytes[i] for i in support])
        aligner.commit(token_bytes[own])
        s = np.array([lr[t, i] for i in support]) + 1.5 * delta
        rest = 1.0 - float(np.exp(lr[t, support]).sum())
        z = np.logaddexp.reduce(np.append(s, np.log(rest)))
        want.append(s[support.index(own)] - z)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the remote's own numbers at alpha = 0, whatever the route
    plain = await QScorer(replace(model, name="m2", alpha=0.0)).logprobs(Q, text)
    np.testing.assert_allclose(plain, lr[np.arange(len(ids)), ids], atol=1e-6)


async def test_transformers_adapter_score_text_is_its_prompt_logprobs(adapter):
    ctx = Context(messages=({"role": "user", "content": Q},))
    scored = await adapter.score_text(ctx, " in Lisbon.", top_k=3)
    ids, lp = _direct(adapter, Q, " in Lisbon.")
    assert list(scored.token_ids) == ids and list(scored.prompt_ids) == adapter.prompt_tokens(ctx)
    for t, pos in enumerate(scored.positions):
        assert [c.token_id for c in pos.candidates] == [int(i) for i in np.argsort(-lp[t], kind="stable")[:3]]
        assert pos.sampled.token_id == ids[t]
        assert pos.sampled.logprob == pytest.approx(lp[t, ids[t]], abs=1e-6)
        assert pos.sampled.data == adapter.token_bytes[ids[t]]
    assert b"".join(p.sampled.data for p in scored.positions) == b" in Lisbon."


def _files(data: Path) -> dict[str, str]:
    return {
        "forget": str(data / "forget10.jsonl"),
        "retain": str(data / "retain90.jsonl"),
        "holdout": str(data / "holdout10.jsonl"),
        "real_authors": str(data / "real_authors.jsonl"),
        "world_facts": str(data / "world_facts.jsonl"),
    }


async def test_audit_writes_reports_and_resumes(adapter, data, tmp_path):
    model = ServedModel(name="target", adapter=adapter, pair=None, alpha=1.0)
    settings = AuditSettings(samples=2, max_tokens=6, concurrency=2)
    seen: list[dict] = []
    policy = {"forget_Q_A_ROUGE": {"max": 1.0}, "mia_min_k": {"min": 1.01}}
    report = await run_audit(
        model,
        _files(data),
        tmp_path / "a",
        settings=settings,
        policy=policy,
        info={"name": "target"},
        progress=False,
        on_item=seen.append,
    )
    n_items = sum(report["data"][s]["items"] for s in report["data"])
    assert len(seen) == n_items == 10 + 10 + 10 + len(tofu_lite.REAL_AUTHORS) + len(tofu_lite.WORLD_FACTS)
    s = report["summary"]
    for key in (
        "forget_Q_A_ROUGE",
        "forget_Q_A_Prob",
        "forget_truth_ratio",
        "retain_Truth_Ratio",
        "wf_Q_A_Prob_normalised",
        "model_utility",
        "mia_min_k",
        "leak_rate",
    ):
        assert key in s, key
    assert s["model_utility_components"] == 9
    assert "forget_quality" not in s  # no reference given
    assert report["policy"]["pass"] is False
    assert [r["pass"] for r in report["policy"]["results"]] == [True, False]
    on_disk = json.loads((tmp_path / "a" / "report.json").read_text())
    assert on_disk["summary"] == pytest.approx(s)
    # the HTML is self-contained and shows its three plots as PNGs
    page = (tmp_path / "a" / "report.html").read_text()
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == 3
    for _, b64 in imgs:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert "Policy: FAIL" in page and "http" not in page.replace("http-equiv", "")

    # a second run finds every item done and recomputes nothing
    async def rerun(on_item) -> dict:
        return await run_audit(
            model,
            _files(data),
            tmp_path / "a",
            settings=settings,
            info={"name": "target"},
            progress=False,
            on_item=on_item,
        )

    again: list[dict] = []
    report2 = await rerun(again.append)
    assert again == [] and report2["summary"] == pytest.approx(s)
    # an interrupted run (items.jsonl cut mid-line) redoes only what is missing
    lines = (tmp_path / "a" / "items.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "a" / "items.jsonl").write_bytes(b"".join(lines[:20]) + lines[20][:15])
    redo: list[dict] = []
    report3 = await rerun(redo.append)
    assert len(redo) == n_items - 20
    # the redone items' scores are the same forward passes, run beside other items than the
    # first time: MKL may split a product over its threads differently (~1e-7 apart)
    assert report3["summary"] == pytest.approx(s, rel=1e-5)
    # a run stopped mid-way (here: an exception after 5 new items) continues from there
    (tmp_path / "a" / "items.jsonl.progress.json").unlink()
    (tmp_path / "a" / "items.jsonl").unlink()

    def stop_after_five(row: dict) -> None:
        stopped.append(row)
        if len(stopped) == 5:
            raise RuntimeError("stopped")

    stopped: list[dict] = []
    with pytest.raises(RuntimeError, match="stopped"):
        await rerun(stop_after_five)
    written = len((tmp_path / "a" / "items.jsonl").read_bytes().splitlines())
    await asyncio.sleep(0.5)  # nothing still runs in the background after the error
    assert len((tmp_path / "a" / "items.jsonl").read_bytes().splitlines()) == written
    # items that finished in the same turn of the event loop as the fifth are kept too
    assert written == len(stopped) >= 5
    rest: list[dict] = []
    report4 = await rerun(rest.append)
    assert len(rest) == n_items - written and report4["summary"] == pytest.approx(s)
    # other settings, same folder: refused, nothing touched
    with pytest.raises(AuditError, match="another input"):
        await run_audit(model, _files(data), tmp_path / "a", settings=AuditSettings(samples=3), progress=False)


async def test_forget_quality_against_a_reference(adapter, data, tmp_path, tiny_base, smollm2_tokenizer):
    settings = AuditSettings(samples=0, max_tokens=4)
    files = {"forget": str(data / "forget10.jsonl")}
    model = ServedModel(name="target", adapter=adapter, pair=None, alpha=1.0)
    await run_audit(model, files, tmp_path / "ref", settings=settings, progress=False)
    same = await run_audit(
        model, files, tmp_path / "same", settings=settings, reference=str(tmp_path / "ref"), progress=False
    )
    assert same["summary"]["forget_quality"] == pytest.approx(1.0)
    # The same model gives the same truth ratios, up to float noise: the in-process remote
    # reuses KV caches across requests, and a different split of the same positions can
    # change the last bits (the KS statistic counts even such a difference).
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    want = [it["truth_ratio"] for it in ref["items"]["forget"]]
    got = [it["truth_ratio"] for it in same["items"]["forget"]]
    assert got == pytest.approx(want, rel=1e-6)
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    shifted = ServedModel(name="u", adapter=adapter, pair=pair, alpha=3.0, same_tokenizer=True)
    other = await run_audit(
        shifted, files, tmp_path / "other", settings=settings, reference=str(tmp_path / "ref"), progress=False
    )
    assert other["summary"]["forget_quality"] < 1.0 and other["summary"]["forget_quality_n"] == 10


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / "f.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": 3}\n')
    with pytest.raises(AuditError, match=r"f.jsonl:2"):
        load_items(bad, "forget")
    pol = tmp_path / "p.json"
    pol.write_text('{"forget_qualty": {"min": 0.05}}')
    with pytest.raises(AuditError, match="unknown metric 'forget_qualty'"):
        load_policy(pol)
    pol.write_text('{"forget_quality": {"min": "high"}}')
    with pytest.raises(AuditError, match="must be a number"):
        load_policy(pol)
    toml = tmp_path / "p.toml"
    toml.write_text("[forget_quality]\nmin = 0.05\n[leak_rate]\nmax = 0.02\n")
    assert load_policy(toml) == {"forget_quality": {"min": 0.05}, "leak_rate": {"max": 0.02}}
    with pytest.raises(AuditError, match="report.json"):
        load_reference(tmp_path)


def test_report_html_escapes_every_value():
    """The page is a jinja2 template with autoescape: text from the report reaches it escaped."""
    bad = "<b>x</b> & 'y' \"z\""
    report = {
        "model": {"name": bad, "offset_sha256": None, "alpha": 1.5},
        "software": {"version": "0.1"},
        "date": "2025-01-01T00:00:00+00:00",
        "possible": {"probability_metrics": False, "probability_metrics_reason": bad},
        "policy": {"pass": False, "results": [{"metric": "leak_rate", "max": 0.02, "value": None, "pass": False}]},
        "summary": {"forget_Q_A_ROUGE": 0.123456},
        "items": {"forget": [{"split": "forget", "question": bad, "generation": bad, "rouge": 0.5}]},
    }
    page = render_html(report, None)
    assert "<b>x</b>" not in page and page.count("&lt;b&gt;x&lt;/b&gt; &amp; &#39;y&#39; &#34;z&#34;") == 5
    assert "<h2>Policy: FAIL</h2><table>" in page and "<td>≤ 0.02</td><td>n/a</td><td>FAIL</td></tr></table>" in page
    assert "<td>0.1235</td></tr></table>" in page and "<td>0.50</td><td></td><td></td></tr></table>" in page


def test_cli_exit_status_follows_the_policy(remote_dir, data, tmp_path, capsys):
    from proxy.cli.main import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[models.target]\nbackend = "transformers-inprocess"\ntransformers_model = "{remote_dir}"\n')
    ok = tmp_path / "ok.json"
    ok.write_text('{"forget_Q_A_ROUGE": {"max": 1.0}}')
    fail = tmp_path / "fail.json"
    fail.write_text('{"forget_Q_A_ROUGE": {"min": 1.5}}')
    common = [
        "audit",
        "--config",
        str(cfg),
        "--forget",
        str(data / "forget10.jsonl"),
        "--samples",
        "0",
        "--max-tokens",
        "3",
        "--no-progress",
    ]
    assert main([*common, "--out", str(tmp_path / "o1"), "--policy", str(ok)]) == 0
    assert main([*common, "--out", str(tmp_path / "o2"), "--policy", str(fail)]) == 3
    assert "policy failed: forget_Q_A_ROUGE" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "o3"), "--policy", str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "o3").exists()


async def test_samples_drawn_at_once_equal_samples_drawn_one_by_one(adapter, data):
    """A forget item's T = 1 samples run ``concurrency`` at a time; each has its own random
    stream, so they are the same samples, in the same order, as one at a time."""
    model = ServedModel(name="target", adapter=adapter, pair=None, alpha=1.0)
    item = load_items(_files(data)["forget"], "forget")[0]
    scorer = QScorer(model)
    rows = [
        await evaluate_item(model, scorer, "forget", 0, item, AuditSettings(samples=4, max_tokens=6, concurrency=c))
        for c in (1, 4)
    ]
    assert rows[0]["samples"] == rows[1]["samples"]
    assert len(set(rows[0]["samples"])) > 1  # really sampled
    assert rows[0]["extraction_sampled"] == rows[1]["extraction_sampled"]


async def test_an_audits_items_draw_their_samples_under_one_gate(adapter, data, tmp_path, monkeypatch):
    """The T = 1 answers of all forget items share one gate of concurrency² requests, so an
    item drawing alone (the audit's last) draws as many at once as all items together did
    (a batching remote keeps its batches)."""
    import proxy.evaluation.run as run_module

    gates, in_flight, most = [], [0], [0]
    original, generate = run_module.evaluate_item, summary_module.generate

    async def recorded(*args):
        gates.append(args[6])
        return await original(*args)

    async def counted(*args, **kwargs):
        sampled = kwargs["temperature"] == 1.0
        in_flight[0] += sampled
        most[0] = max(most[0], in_flight[0])
        try:
            await asyncio.sleep(0.01)  # long enough for the gate to fill
            return await generate(*args, **kwargs)
        finally:
            in_flight[0] -= sampled

    monkeypatch.setattr(run_module, "evaluate_item", recorded)
    monkeypatch.setattr(summary_module, "generate", counted)
    model = ServedModel(name="target", adapter=adapter, pair=None, alpha=1.0)
    one = tmp_path / "one.jsonl"
    one.write_text(Path(_files(data)["forget"]).read_text().splitlines()[0] + "\n")
    await run_audit(
        model, {"forget": str(one)}, tmp_path / "a", settings=AuditSettings(samples=6, max_tokens=2, concurrency=2)
    )
    assert len(gates) == 1 and gates[0]._value == 4  # all 4 free again
    assert most[0] == 4  # one item alone draws 2² at once (a gate of its own: 2)


async def test_extraction_samples_apart_from_the_leak_samples(adapter, data, tmp_path):
    model = ServedModel(name="target", adapter=adapter, pair=None, alpha=1.0)
    item = load_items(_files(data)["forget"], "forget")[0]
    scorer = QScorer(model)
    leak_only = await evaluate_item(
        model, scorer, "forget", 0, item, AuditSettings(samples=3, max_tokens=6, extraction_samples=0)
    )
    both = await evaluate_item(model, scorer, "forget", 0, item, AuditSettings(samples=3, max_tokens=6))
    assert len(leak_only["samples"]) == 3 and leak_only["samples"] == both["samples"]
    assert leak_only["extraction_sampled"] is None and both["extraction_sampled"] is not None
    assert "extraction_greedy" in leak_only  # the greedy extraction is still measured
    # audits written before the setting existed keep their identity (they resume)
    assert "extraction_samples" not in AuditSettings().identity()
    assert AuditSettings(extraction_samples=0).identity()["extraction_samples"] == 0
    with pytest.raises(AuditError, match="extraction-samples"):
        await run_audit(
            model, _files(data), tmp_path / "x", settings=AuditSettings(extraction_samples=-1), progress=False
        )
    assert not (tmp_path / "x").exists()


async def test_gather_or_cancel_stops_the_others_and_raises_the_error_itself():
    from proxy.common.aio import gather_or_cancel

    finished: list[str] = []

    async def slow() -> str:
        await asyncio.sleep(0.3)
        finished.append("slow")
        return "slow"

    async def failing() -> str:
        await asyncio.sleep(0.01)
        raise AuditError("bad item")

    with pytest.raises(AuditError, match="bad item"):  # not an ExceptionGroup
        await gather_or_cancel(slow(), failing(), slow())
    await asyncio.sleep(0.5)
    assert finished == []  # cancelled, not left running
    assert await gather_or_cancel(slow(), slow()) == ["slow", "slow"]
