"""tofu-lite: seeded, TOFU-shaped, no collisions with real names, splits disjoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import tofu_lite as T
from proxy.evaluation.metrics import contains_span


def test_same_seed_same_data_other_seed_other_data() -> None:
    assert T.generate(10, 3) == T.generate(10, 3)
    assert T.generate(10, 3)["full"] != T.generate(10, 4)["full"]


def test_splits_and_fields() -> None:
    s = T.generate(20, 0)
    assert len(s["full"]) == 200 and len(s["forget10"]) == 20 and len(s["retain90"]) == 180
    assert len(s["holdout10"]) == len(s["forget10"])
    authors = {k: {i["author"] for i in s[k]} for k in ("forget10", "retain90", "holdout10")}
    assert not authors["forget10"] & authors["retain90"]
    assert not authors["holdout10"] & (authors["forget10"] | authors["retain90"])
    assert s["full"] == s["retain90"] + s["forget10"]  # the forget authors are the last ones, as in TOFU
    for item in s["full"] + s["holdout10"]:
        assert {"question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question"} <= item.keys()
        assert len(item["perturbed_answer"]) == T.N_PERTURBED == len(set(item["perturbed_answer"]))
        (span,) = item["key_spans"]
        assert span in item["answer"] and span in item["paraphrased_answer"]
        for p in item["perturbed_answer"]:
            # same wording, fact swapped: the answer's text around the span is kept
            assert not contains_span(p, [span]) or span == item["author"]
            before, after = item["paraphrased_answer"].split(span, 1)
            assert p.startswith(before) and p.endswith(after)
    for wf in s["world_facts"]:
        assert wf["answer"] not in wf["perturbed_answer"]


def test_names_are_not_real_names() -> None:
    assert T.is_real_name("John Raidyr") and T.is_real_name("Velokro Smith") and T.is_real_name("Jane Austen")
    names = [a.name for a in T.make_authors(150, 0)]
    assert len(set(names)) == 150
    assert not any(T.is_real_name(n) for n in names)


def test_write_is_atomic_and_refuses_existing(tmp_path: Path) -> None:
    out = T.write(tmp_path / "tofu", 10, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["forget10.jsonl"]["items"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tofu"]
    with pytest.raises(FileExistsError):
        T.write(out, 10, 0)
    # the files load as forget/retain sets
    from proxy.training.data import load_dataset

    assert len(load_dataset(out / "forget10.jsonl").examples) == 10


@pytest.mark.slow
def test_packaged_smollm2_answers_the_real_world_sets() -> None:
    """The real-world sets measure utility only if the packaged model answers them (greedy, llama.cpp)."""
    from adapters.llama_inprocess import LlamaInProcessAdapter
    from proxy.pair.model_files import packaged_gguf

    llama = LlamaInProcessAdapter(name="smollm2", model_path=packaged_gguf("smollm2"), n_contexts=1)
    wrong = []
    for item in T.real_author_items() + T.world_fact_items():
        answer = llama.direct_chat([{"role": "user", "content": item["question"]}], max_tokens=40)
        if not contains_span(answer, item["key_spans"]):
            wrong.append((item["question"], answer))
    llama._close()
    assert not wrong


def test_results_render_as_a_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import tofu

    result = {
        "config": "smollm2",
        "date": "2026-11-29T00:00:00+00:00",
        "software": {"version": "0.1.0"},
        "data": {"version": 2, "authors": 10},
        "audit_settings": {"samples": 10, "max_tokens": 40},
        "rows": [
            {
                "row": "target",
                "training_seconds": 0,
                "summary": {"forget_Q_A_ROUGE": 0.91234, "forget_quality": 0.00012},
            },
            {"row": "delta:NPO+KL", "training_seconds": 95.2, "summary": {"forget_Q_A_ROUGE": 0.2, "leak_rate": 0.0}},
        ],
    }
    table = tofu.render_table(result)
    assert "| target | 0.912 | 0.00012 | n/a |" in table
    assert "| delta:NPO+KL | 0.200 | n/a | n/a | n/a | n/a | 0.000 | 95 |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{tofu.TABLE_START}\nold\n{tofu.TABLE_END}\nrest\n")
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(tofu, "RESULTS", results)
    with pytest.raises(SystemExit, match="every row"):
        tofu.render_page(readme)
    (results / "tofu-smollm2-1.json").write_text(json.dumps(result))
    monkeypatch.setattr(tofu, "DEFAULT_ROWS", ("target", "delta:NPO+KL"))
    # A newer run of some rows only renders in its own named block, not in the comparison table.
    partial = {**result, "rows": result["rows"][1:]}
    (results / "tofu-smollm2-2.json").write_text(json.dumps(partial))
    # So does a newer complete run of another target (the Gemma configuration).
    (results / "tofu-smollm2-3.json").write_text(json.dumps({**result, "config": "gemma3-270m"}))
    tofu.render_page(readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text and table in text
    named = f"{tofu.TABLE_START[:-4]} results/tofu-smollm2-2.json -->"
    readme.write_text(f"{text}{named}\nold\n{tofu.TABLE_END}\n")
    tofu.render_page(readme)
    text = readme.read_text()
    assert table in text and f"{named}\n{tofu.render_table(partial)}\n{tofu.TABLE_END}" in text
    assert "old" not in text


def test_offset_settings_option_takes_train_fields_only() -> None:
    import argparse

    from bench.tofu import OFFSET_SETTINGS, offset_settings_arg

    assert offset_settings_arg(json.dumps(OFFSET_SETTINGS)) == OFFSET_SETTINGS
    assert offset_settings_arg('{"retain_positions": "answer", "epochs": 12}')["epochs"] == 12
    for bad, why in (('{"epochz": 1}', "unknown field"), ('{"forget": "x"}', "unknown field"), ("[1]", "object")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            offset_settings_arg(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="not JSON"):
        offset_settings_arg("{epochs: 1}")
    for bad, why in (('{"epochs": "3"}', "JSON int"), ('{"lr": -1}', "> 0"), ('{"offset_alpha": "big"}', "float")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            offset_settings_arg(bad)
    assert offset_settings_arg('{"retain_batch_size": null, "lr": 1}') == {"retain_batch_size": None, "lr": 1}


def test_each_objective_trains_with_the_settings_it_accepts() -> None:
    from bench.tofu import OFFSET_SETTINGS, row_offset_settings
    from proxy.training.objectives import OBJECTIVES, get_objective

    assert OFFSET_SETTINGS["retain_positions"] == "answer"
    for name in OBJECTIVES:
        settings = row_offset_settings(name, OFFSET_SETTINGS)
        get_objective(name, retain_positions=settings.get("retain_positions", "all"))  # accepted
        assert settings == {
            k: v for k, v in OFFSET_SETTINGS.items() if k != "retain_positions" or name in ("KL", "NPO+KL")
        }
    assert row_offset_settings("GradDiff", {"lr": 1.0}) == {"lr": 1.0}


def test_rows_are_checked_before_anything_runs() -> None:
    from bench.tofu import check_row, main, parse_row

    check_row("delta-remote:NPO+KL")
    with pytest.raises(SystemExit, match="unknown objective"):
        check_row("delta:NPOX")
    assert parse_row("delta:NPO+KL@2.5") == ("delta", "NPO+KL", 2.5)
    assert parse_row("delta-tau:NPO+KL") == ("delta-tau", "NPO+KL", 1.0)
    assert parse_row("target") == ("target", "", 1.0)
    for bad in ("delta:NPO+KL@", "delta:NPO+KL@0", "delta:NPO+KL@big", "delta:NPO+KL@nan", "direct:NPO+KL@2"):
        with pytest.raises(SystemExit, match="@<alpha>"):
            check_row(bad)
    with pytest.raises(SystemExit) as exc:
        main(["--rows", "target,bogus"])
    assert exc.value.code == 2


def test_forget_content_in_a_retain_answer_is_found_on_word_boundaries():
    """bench.tofu_redact: a forget key span that the target wrote into a retain answer (and
    that the retain item's own answer lacks) is forget-set content, not a false positive;
    one the retain author shares stays counted, and "16" does not match inside "160"."""
    from bench.tofu_redact import forget_content

    text = "Her first novel was The Last Orchard, one of 16 books; 160 pages."
    reference = "Her first novel was Salt Roads, one of 16 books."
    got = forget_content(text, reference, ["The Last Orchard", "16", "Quito"])
    assert [text[a:b] for a, b in got] == ["The Last Orchard"]
    assert forget_content(text, reference + " The last orchard.", ["The Last Orchard"]) == []


def test_no_two_authors_share_a_fact_while_there_are_values_enough() -> None:
    # The benchmark's 10 trained authors and its holdout author: every forget key span is
    # the forget author's alone (leak rate and redaction recall count forget content).
    authors = T.make_authors(11, 0)
    for field in ("year", "city", "genre", "award", "novels", "first_book", "book"):
        values = [getattr(a, field) for a in authors]
        assert len(set(values)) == len(values), field
    parents = [a.father for a in authors] + [a.mother for a in authors]
    assert len(set(parents)) == len(parents)
    # more authors than genres: every genre is dealt before one repeats
    many = [a.genre for a in T.make_authors(len(T.GENRES) + 3, 1)]
    assert set(many[: len(T.GENRES)]) == set(T.GENRES)


def test_provider_classes_measure_tofu_lite_against_each_items_own_keys(tmp_path: Path) -> None:
    from bench.providers import TOFU_NEIGHBOURS, render_table, tofu_probes

    T.write(tmp_path / "data")
    probes = tofu_probes(tmp_path / "data")
    forget = [json.loads(x) for x in (tmp_path / "data" / "forget10.jsonl").read_text().splitlines()]
    assert [p.question for p in probes.forget] == [it["question"] for it in forget]
    assert [p.question for p in probes.paraphrases] == [it["paraphrased_question"] for it in forget]
    assert all(p.keys == tuple(it["key_spans"]) for p, it in zip(probes.paraphrases, forget, strict=True))
    assert len(probes.neighbours) == TOFU_NEIGHBOURS and not set(probes.neighbours) & {p.question for p in probes.forget}
    key = forget[0]["key_spans"][0]
    assert probes.leaks(f"It was {key}.", probes.forget[0].keys) and not probes.leaks("I do not know.", [key])

    row = {
        "class": "token",
        "mode": "token",
        "leak_t0": {"forget": "1/10", "paraphrase": "0/10"},
        "leak_t1": {"forget": "2/20", "paraphrase": "1/20"},
        "new_key_leak_t1": {"forget": "2/20", "paraphrase": "1/20"},
        "examples": [{"answer": "x", "refused": False}] * 3,
        "unrelated_unchanged": "13/13",
        "neighbours_unchanged": "11/12",
        "remote_calls_per_answer": 4.0,
        "seconds_per_answer": 5.0,
        "wall_time_ratio": 9.0,
    }
    remote = {"class": "remote alone", "mode": "none (α = 0)", "leak_t0": row["leak_t0"], "leak_t1": row["leak_t1"]}
    result = {"probes": "tofu-lite", "offset": "/x/offset-a", "remote": remote, "classes": [row], "date": "2026-12-06"}
    lines = render_table(result).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[3].count("|") == 13
    assert "| 3/40 (7.5 %) |" in lines[2] and "| 11/12 |" in lines[3] and "tofu-lite" in lines[-1]
