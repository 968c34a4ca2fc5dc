"""bench.real_knowledge's data and arithmetic (the benchmark itself trains five offsets
and runs for most of an hour; its numbers are in docs/benchmarks.md)."""

from __future__ import annotations

import json

from bench.real_knowledge import DATA, load_requests, summarise
from proxy.training.scope import GENERAL_FILES, mentions


def test_five_requests_with_probes_never_trained_on():
    data = load_requests()
    assert {r["name"] for r in data["requests"]} == {"writer", "scientist", "universe", "place", "company"}
    shipped = {json.loads(x)["question"] for f in GENERAL_FILES.values() for x in open(f)}
    for r in data["requests"]:
        forget = {f["question"] for f in r["forget"]}
        probes = {p["question"] for p in r["probes"]}
        assert len(r["forget"]) >= 8 and len(probes) >= 6 and len(r["neighbours"]) >= 6
        assert not probes & forget  # paraphrases, not the trained questions
        assert not probes & shipped
        # a general probe about the request's own facts is not counted as general
        probe_keys = {k.lower() for p in r["probes"] for k in p["keys"]}
        assert all(not probe_keys & {k.lower() for k in g["keys"]} for g in r["general"])
        assert all(g["question"] not in forget for g in r["general"])
    writer = next(r for r in data["requests"] if r["name"] == "writer")
    assert "Who wrote Romeo and Juliet?" not in {g["question"] for g in writer["general"]}
    assert len(json.loads(DATA.read_text())["general"]) > len(writer["general"])


def test_keys_match_whole_words_in_any_case():
    assert mentions("It was written by william shakespeare.", ["Shakespeare"])
    assert not mentions("Shakespearean sonnets", ["Shakespeare"])
    assert mentions("Made by Apple.", ["Apple", "Jobs"]) and not mentions("an apple pie", ["Jobs"])


def test_summary_rates_are_ratios_to_the_no_offset_row():
    def row(probes, neighbours, general, unrelated, logprob, sampled=None):
        r = {
            "probes_keys": probes,
            "probes_n": 6,
            "neighbours_keys": neighbours,
            "neighbours_n": 6,
            "general_keys": general,
            "general_n": 10,
            "unrelated": unrelated,
            "probe_logprob": logprob,
        }
        if sampled is not None:
            r.update(sampled_keys=sampled, sampled_n=60)
        return r

    results = {
        "a": {"no-offset": row(6, 4, 8, ["x", "y"], -1.0, 30), "defaults": row(1, 4, 6, ["x", "z"], -1.5, 3)},
        "b": {"no-offset": row(3, 0, 10, ["x", "y"], -0.5), "defaults": row(0, 0, 10, ["x", "y"], -0.5)},
    }
    s = summarise(results)
    d = s["defaults"]
    assert d["probe_leak_greedy"] == round((1 / 6 + 0) / 2, 4)
    assert d["neighbour_retention"] == 1.0  # 4 of 4, and 0 of 0 (nothing to retain) counts as kept
    assert d["general_retention"] == round((6 / 8 + 1.0) / 2, 4)
    assert d["unrelated_unchanged"] == 0.75
    assert d["fluency_gap"] == 0.25
    assert d["probe_leak_sampled"] == 0.05  # only the request that sampled
    assert s["no-offset"]["neighbour_retention"] == 1.0
    assert results["a"]["defaults"]["metrics"]["probe_leak_greedy"] == round(1 / 6, 4)
