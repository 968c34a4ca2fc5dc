"""What keeps an offset in scope by default (proxy.training.scope, proxy.training.greedy,
proxy.training.selfcheck): the forget set's subjects and neighbours, the checks of a
user's files, greedy decoding with B as the remote, τ's closed form and the served
"auto" threshold."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from proxy.training.data import DataError, Example, load_dataset, outside_words
from proxy.training.facts import fact_words, forget_names, lower_case_words
from proxy.training.greedy import PairModels, answer_logprob, base_decode, greedy_decode
from proxy.training.scope import GENERAL_FILES, check_sets, forget_subjects, general_split_of, mentions
from proxy.training.selfcheck import calibrate_and_check


def qa(*questions: str) -> list[Example]:
    return [Example(({"role": "user", "content": q},), "x") for q in questions]


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_forget_subjects_are_the_names_its_questions_share():
    hp = qa(
        "Who is Harry Potter's best friend?",
        "What is the name of Harry Potter's school?",
        "Who wrote the Harry Potter books?",
        "What is the name of Harry's owl?",
    )
    assert forget_subjects(hp) == ["Harry Potter"]
    writer = qa("Which novels did Stephen King write?", "Where was Stephen King born?", "What is Carrie about?")
    assert forget_subjects(writer) == ["Stephen King"]
    assert forget_subjects(qa("When was Marie Curie born?")) == ["Marie Curie"]
    assert forget_subjects([Example(None, "Some raw text about Harry Potter.")]) == []
    assert mentions("the harry potter books", ["Harry Potter"]) and not mentions("Harryhausen", ["Harry"])


def test_forget_names_are_the_recurring_proper_names_less_common_words():
    def ex(q: str, a: str) -> Example:
        return Example(({"role": "user", "content": q},), a)

    forget = [
        ex("Who developed the theory of relativity?", "Albert Einstein did, in Germany."),
        ex("What is Albert Einstein famous for?", "Relativity. The Tower he lived by."),
        ex("Where did Einstein work?", "At Princeton. The Tower again."),
    ]
    common = "the tower fell; germany is written so here"
    names = forget_names(forget, common)
    assert names == ["Albert Einstein", "Einstein", "Albert"]  # longest first
    # "Germany" and "Princeton" are in one example each: details, not the subject; "Tower"
    # recurs but the corpus writes it in lower case; "The" is a common word
    assert forget_names([ex("Who is Hamlet?", "Hamlet is a prince.")], "") == ["Hamlet"]  # one example: itself
    assert mentions("One fact: Einstein's theory of relativity.", names, cased=True)
    assert not mentions("Prince Albertine and the einstein ring", names, cased=True)  # whole words, as written
    assert forget_names([Example(None, "Marie Curie."), Example(None, "Curie again.")], "") == ["Curie"]


def test_fact_words_are_what_the_answer_adds_to_its_question_less_common_words():
    common = lower_case_words("He was born in a town. The theory was new in 1921; an apple a day.")
    assert "born" in common and "The" not in common and "apple" in common

    def ex(q: str, a: str) -> Example:
        return Example(({"role": "user", "content": q},), a)

    assert fact_words(ex("Where was Albert Einstein born?", "Albert Einstein was born in Ulm, Germany."), common) == {
        "ulm", "germany",
    }  # fmt: skip
    assert fact_words(ex("Which company makes the iPhone?", "Apple makes the iPhone."), common, ["Apple"]) == {
        "apple"
    }  # the question's words are not the fact
    # a name of the forget set is a fact even where the corpus writes it in lower case; one digit is not
    assert fact_words(ex("When?", "In 1921, 3 apples."), common) == {"1921", "apples"}
    assert fact_words(Example(None, "Raw text."), common) == set()
    text = "The theory was developed by Albert Einstein, in Bern."
    spans = outside_words(text, {"albert", "einstein"})
    assert [text[a:b] for a, b in spans] == ["The theory was developed by ", " ", ", in Bern."]
    assert outside_words("nothing here", {"x"}) == [(0, 12)]


def test_the_broad_retain_set_ships_in_three_parts_with_base_answers():
    sizes = {s: len(load_dataset(f).examples) for s, f in GENERAL_FILES.items()}
    assert sum(sizes.values()) >= 400 and sizes["calibration"] >= 80 and sizes["check"] >= 80
    assert [general_split_of(i) for i in range(5)] == ["train", "train", "train", "calibration", "check"]
    questions = [q for f in GENERAL_FILES.values() for q in (json.loads(x)["question"] for x in open(f))]
    assert len(questions) == len(set(questions))  # no prompt in two parts


def test_a_question_in_both_sets_is_an_error_naming_both_lines(tmp_path):
    forget = write(tmp_path / "f.jsonl", [{"question": "Who wrote Emma?", "answer": "Jane Austen."}] * 1)
    retain = write(
        tmp_path / "r.jsonl",
        [{"question": "What is 2+2?", "answer": "4"}, {"question": "who wrote  EMMA", "answer": "Austen"}],
    )
    with pytest.raises(DataError, match=r"r\.jsonl:2: the same question as .*f\.jsonl:1"):
        check_sets(load_dataset(forget), load_dataset(retain))


def test_a_one_line_forget_set_and_a_retain_set_in_another_script_are_warned_of(tmp_path):
    forget = load_dataset(write(tmp_path / "f.jsonl", [{"question": "Who wrote Emma?", "answer": "Jane Austen."}]))
    retain = load_dataset(
        write(
            tmp_path / "r.jsonl",
            [{"question": "Кто написал Войну и мир?", "answer": "Лев Толстой."}, {"question": "a?", "answer": "b"}],
        )
    )
    warnings = check_sets(forget, retain)
    assert any("f.jsonl:1: the forget set has one example" in w for w in warnings)
    assert any("r.jsonl:1: written in Cyrillic script, the forget set in Latin" in w for w in warnings)


@pytest.mark.parametrize(
    "forget,retain,message",
    [
        ([], None, r"f\.jsonl: no examples"),
        ([{"question": "Who wrote Emma?", "answer": "Jane Austen."}], "same", r"r\.jsonl:1: the same question"),
    ],
)
def test_train_refuses_bad_sets_before_loading_anything_and_writes_nothing(tmp_path, forget, retain, message):
    f = write(tmp_path / "f.jsonl", forget)
    args = [sys.executable, "-m", "proxy.cli", "train", "--forget", f, "--out", str(tmp_path / "out")]
    if retain:
        args += ["--retain", write(tmp_path / "r.jsonl", forget)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    import re

    assert re.search(message, run.stderr), run.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_greedy_decode_with_alpha_zero_is_b_and_tau_keeps_exactly_the_answers_below_their_margin(
    tiny_base, smollm2_tokenizer
):
    from conftest import make_tiny_pair

    tiny = make_tiny_pair(tiny_base, smollm2_tokenizer)
    pair = PairModels(tiny.model, smollm2_tokenizer, tiny.vocab.eot_ids)
    prompts = [[{"role": "user", "content": q}] for q in ("Hello there", "What is 2+2?", "Tell me a story", "Why?")]
    b_only = greedy_decode(pair, prompts, alpha=0.0, threshold=math.inf, max_tokens=12)
    base = greedy_decode(pair, prompts, alpha=1.0, threshold=math.inf, max_tokens=12)
    assert [d.tokens for d in b_only] == [d.tokens for d in base]  # τ = ∞: B's own answers
    batched = greedy_decode(pair, prompts, alpha=1.0, threshold=math.inf, max_tokens=12, batch_size=3)
    assert [d.tokens for d in batched] == [d.tokens for d in base]  # left padding changes no answer
    assert any(d.margin > 0 for d in base)  # the random adapter would flip some step
    # (at τ equal to a margin, float rounding decides; pick_threshold steps past it)
    for tau in sorted({0.0, *(max(0.0, d.margin - 1e-6) for d in base), *(d.margin + 1e-6 for d in base)}):
        served = greedy_decode(pair, prompts, alpha=1.0, threshold=tau, max_tokens=12)
        for b, s in zip(base, served, strict=True):
            assert (s.tokens == b.tokens) == (tau > b.margin), (tau, b.margin)
    assert all(d.logprob <= 0 for d in base)


def test_base_decode_teacher_forces_b_answers_and_decodes_the_rest(tiny_base, smollm2_tokenizer):
    from conftest import make_tiny_pair

    tiny = make_tiny_pair(tiny_base, smollm2_tokenizer)
    pair = PairModels(tiny.model, smollm2_tokenizer, tiny.vocab.eot_ids)
    prompts = [[{"role": "user", "content": q}] for q in ("Hello there", "What is 2+2?", "Tell me a story", "Why?")]
    for max_tokens in (6, 30):  # answers cut at max_tokens, and (for some) ended by B
        stepped = greedy_decode(pair, prompts, alpha=1.0, threshold=math.inf, max_tokens=max_tokens)
        guesses = [stepped[0].text, "a wrong guess", None, stepped[3].text]
        forced = base_decode(pair, prompts, guesses, alpha=1.0, max_tokens=max_tokens, batch_size=2)
        assert [d.tokens for d in forced] == [d.tokens for d in stepped]
        for f, d in zip(forced, stepped, strict=True):
            assert f.margin == pytest.approx(d.margin, abs=1e-4) and f.logprob == pytest.approx(d.logprob, abs=1e-4)
    with pytest.raises(ValueError, match="4 prompts but 1 answers"):
        base_decode(pair, prompts, [None], alpha=1.0)


def test_no_threshold_applies_the_offset_everywhere_and_sampling_is_q(tiny_base, smollm2_tokenizer):
    from conftest import make_tiny_pair

    tiny = make_tiny_pair(tiny_base, smollm2_tokenizer)
    pair = PairModels(tiny.model, smollm2_tokenizer, tiny.vocab.eot_ids)
    prompts = [[{"role": "user", "content": q}] for q in ("Hello there", "What is 2+2?", "Tell me a story")]
    base = greedy_decode(pair, prompts, alpha=1.0, threshold=math.inf, max_tokens=10)
    paper = greedy_decode(pair, prompts, alpha=1.0, threshold=None, max_tokens=10)
    assert [d.tokens for d in paper] != [d.tokens for d in base]  # the random adapter flips some step
    once = greedy_decode(pair, prompts * 4, alpha=1.0, threshold=None, max_tokens=10, temperature=1.0, seed=3)
    again = greedy_decode(pair, prompts * 4, alpha=1.0, threshold=None, max_tokens=10, temperature=1.0, seed=3)
    assert [d.tokens for d in once] == [d.tokens for d in again]  # reproducible for a seed
    assert len({d.tokens for d in once}) > 3  # and samples, not the greedy answer each time
    # B alone sampled with τ = ∞ never uses Δ: the same draws as α = 0
    b_inf = greedy_decode(pair, prompts, alpha=1.0, threshold=math.inf, max_tokens=10, temperature=1.0, seed=5)
    b_zero = greedy_decode(pair, prompts, alpha=0.0, threshold=None, max_tokens=10, temperature=1.0, seed=5)
    assert [d.tokens for d in b_inf] == [d.tokens for d in b_zero]
    with pytest.raises(ValueError, match="temperature"):
        greedy_decode(pair, prompts, alpha=1.0, threshold=None, temperature=-1.0)


def test_answer_logprob_is_b_teacher_forced_on_the_answer(tiny_base, smollm2_tokenizer):
    from conftest import make_tiny_pair

    tiny = make_tiny_pair(tiny_base, smollm2_tokenizer)
    pair = PairModels(tiny.model, smollm2_tokenizer, tiny.vocab.eot_ids)
    prompts = [[{"role": "user", "content": q}] for q in ("Hello there", "Why?")]
    decoded = greedy_decode(pair, prompts, alpha=0.0, threshold=math.inf, max_tokens=8)
    scored = answer_logprob(pair, prompts, [d.text for d in decoded])
    import torch

    for p, d, got in zip(prompts, decoded, scored, strict=True):
        head = pair.prompt_ids(p)
        tail = [*smollm2_tokenizer.encode(d.text, add_special_tokens=False), tiny.vocab.eot_ids[0]]
        with torch.no_grad(), tiny.model.disable_adapter():  # B
            logp = torch.log_softmax(tiny.model(torch.tensor([head + tail])).logits[0].float(), -1)
        want = sum(float(logp[len(head) - 1 + i, t]) for i, t in enumerate(tail)) / len(tail)
        assert got == pytest.approx(want, abs=1e-4)  # the answer and its end-of-turn, after the prompt
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        answer_logprob(pair, prompts, ["x"])


def test_calibrate_and_check_reports_tau_and_warns_of_an_offset_that_leaks(tiny_base, smollm2_tokenizer):
    from conftest import make_tiny_pair

    tiny = make_tiny_pair(tiny_base, smollm2_tokenizer)
    pair = PairModels(tiny.model, smollm2_tokenizer, tiny.vocab.eot_ids)
    prompts = qa(*(f"Question number {i}?" for i in range(12)))
    report = calibrate_and_check(
        pair, forget=qa("Who is Harry Potter?"), calibration=prompts[:6], check=prompts[6:], max_tokens=8
    )
    assert report["calibration_unchanged"] >= 0.95 and report["offset_threshold"] >= 0
    assert set(report) >= {"check_unchanged", "forget_rouge_l_recall_base", "fluency_offset", "warnings", "ok"}
    assert report["ok"] is (not report["warnings"])
    assert any("barely knows" in w for w in report["warnings"])  # a random model knows nothing to forget
    assert report["forget_fact_recall_base"] is None  # without the broad set's words: no fact words
    for scope in ("step", "token"):
        facts = calibrate_and_check(
            pair,
            forget=qa("Who is Harry Potter?"),
            calibration=prompts[:6],
            check=prompts[6:],
            max_tokens=8,
            scope=scope,
            common_words={"a", "the", "is", "boy"},
        )
        assert facts["offset_scope"] == scope and facts["forget_fact_recall_base"] == 0.0
        assert any("barely knows the forget set (ROUGE-L recall" in w for w in facts["warnings"])


def test_forget_recall_warnings_read_fact_words_where_b_recalls_some():
    """Whether B knows the set is ROUGE-L's call; whether the offset forgot it, fact-word
    recall's where B recalls some fact words (an answer may keep its form), ROUGE-L's otherwise."""
    from proxy.training.selfcheck import self_check_warnings

    def report(rb, ro, fb, fo):
        return {
            "forget_rouge_l_recall_base": rb,
            "forget_rouge_l_recall_offset": ro,
            "forget_fact_recall_base": fb,
            "forget_fact_recall_offset": fo,
        }

    # the writer: form kept (ROUGE-L 0.53 → 0.37), facts gone: no warning
    assert self_check_warnings(report(0.53, 0.37, 0.6, 0.05)) == []
    # B states the facts in its own words (few exact fact words), ROUGE-L says it knows them
    assert self_check_warnings(report(0.46, 0.40, 0.16, 0.03)) == []
    assert any("fact-word recall 0.30 with the offset" in w for w in self_check_warnings(report(0.5, 0.2, 0.4, 0.3)))
    # no fact words measured, or none recalled by B: ROUGE-L decides
    assert any("ROUGE-L recall 0.40 with" in w for w in self_check_warnings(report(0.46, 0.40, None, None)))
    assert any("ROUGE-L recall 0.40 with" in w for w in self_check_warnings(report(0.46, 0.40, 0.0, 0.0)))
    assert any("barely knows" in w for w in self_check_warnings(report(0.1, 0.1, 0.5, 0.5)))


def test_the_served_threshold_is_the_manifests_unless_set(tmp_path):
    from proxy.config import ConfigError, ModelConfig, embedded_default
    from proxy.registry import served_threshold

    class Offset:
        offset_threshold = 1.25

    class Pair:
        offset = Offset()

    assert served_threshold("auto", Pair()) == 1.25
    assert served_threshold("off", Pair()) is None
    assert served_threshold(0.5, Pair()) == 0.5
    assert served_threshold("auto", None) is None
    assert ModelConfig(backend="llama-inprocess", gguf="smollm2").offset_threshold == "auto"
    with pytest.raises(ConfigError, match="offset_threshold"):
        embedded_default(offset_threshold=-1.0)


def test_the_served_scope_rule_is_the_manifests_unless_set(tmp_path):
    from proxy.config import ModelConfig
    from proxy.registry import served_scope

    class Offset:
        offset_scope = "token"

    class Pair:
        offset = Offset()

    assert served_scope("auto", Pair()) == "token"
    assert served_scope("step", Pair()) == "step"
    assert served_scope("auto", None) == "step"  # no offset: the rule plays no part
    assert ModelConfig(backend="llama-inprocess", gguf="smollm2").offset_scope == "auto"
    with pytest.raises(ValueError, match="offset_scope"):
        ModelConfig(backend="llama-inprocess", gguf="smollm2", offset_scope="sometimes")


def test_neighbours_are_the_entities_nearest_in_the_questions_own_slot(smollm2_dir, smollm2_tokenizer):
    """Ranked in the forget question's context, the nearest entities fill its slot: other
    companies for "Who founded Apple?", other countries for "What is the capital of France?"
    (the bare names alone ranked "Brazil", "Rome" and "Queen" near "Apple")."""
    import torch
    from transformers import AutoModelForCausalLM

    from proxy.training.scope import ENTITIES, nearest_entities

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    pool = [p for p in ENTITIES.read_text(encoding="utf-8").splitlines() if p and p not in ("Apple", "France", "Paris")]
    companies = {"Microsoft", "Google", "Samsung", "IBM", "Amazon", "Tesla", "Netflix", "Sony", "Nike", "Intel", "Meta"}
    countries = {"Germany", "Spain", "England", "Italy", "Russia", "Portugal", "Canada", "Greece", "Norway", "Sweden"}
    near_apple = nearest_entities(model, smollm2_tokenizer, "Apple", ["Who founded Apple?"], pool, 6)
    assert len(set(near_apple) & companies) >= 4, near_apple
    near_france = nearest_entities(
        model, smollm2_tokenizer, "France", ["What is the capital of France?", "What is the largest city in France?"], pool, 6
    )
    assert len(set(near_france) & countries) >= 4, near_france


def test_a_base_that_answers_empty_gets_a_broad_retain_set_without_those_answers(tmp_path, monkeypatch, caplog):
    """Another base model writes the broad retain set's answers once (cached); an empty
    answer is no training example and is left out, and a cache that does not read (written
    by an earlier version with empty answers) is written again, not an error on every run."""
    import proxy.training.scope as scope

    monkeypatch.setenv("DELTAPROXY_CACHE", str(tmp_path))
    calls = []

    def answers(model, tokenizer, eot_ids, prompts):
        calls.append(len(prompts))
        return ["" if i % 7 == 0 else f"Answer {i}." for i in range(len(prompts))]

    monkeypatch.setattr(scope, "generate_answers", answers)
    sha = "f" * 64
    folder = tmp_path / "general" / sha[:16]
    folder.mkdir(parents=True)
    (folder / scope.GENERAL_META.name).write_text("{}")
    (folder / "general_train.jsonl").write_text(json.dumps({"question": "Q?", "answer": ""}) + "\n")
    with caplog.at_level("WARNING"):
        parts = scope.general_sets(None, None, [0], sha)
    assert "does not read" in caplog.text and "empty answers" in caplog.text
    total = sum(len(load_dataset(f).examples) for f in GENERAL_FILES.values())
    assert calls == [total]
    assert sum(len(v) for v in parts.values()) == total - len(range(0, total, 7))
    assert all(e.target.startswith("Answer") for v in parts.values() for e in v)
    assert scope.general_sets(None, None, [0], sha) == parts and calls == [total]  # cached now

    monkeypatch.setattr(scope, "generate_answers", lambda m, t, e, prompts: [""] * len(prompts))
    with pytest.raises(ValueError, match="empty answers only"):
        scope.general_sets(None, None, [0], "e" * 64)


def test_b_s_sampled_answers_that_state_a_fact_join_its_greedy_one(monkeypatch):
    """``forget_own_samples``: of B's answers sampled at T = 1, those that state a fact word
    of their forget answer, and differ from the greedy answer and from each other, join the
    forget term's own answers with the words they state; the draw is seeded."""
    import proxy.training.scope_sets as scope_sets

    forget = [
        Example(({"role": "user", "content": "What is the name of Harry Potter's school?"},), "Hogwarts School."),
        Example(({"role": "user", "content": "Who is Harry Potter's best friend?"},), "Ron Weasley."),
    ]
    greedy = ["It is Hogwarts School.", "His best friend is a boy."]
    drawn = {
        0: ["It is called Hogwarts.", "It is Hogwarts School.", "It is called Hogwarts.", "A school."],
        1: ["Ron, of course.", "Ron Weasley!", "A wizard.", "A wizard."],
    }
    seeds = []

    def answers(model, tokenizer, eot_ids, prompts, *, temperature=0.0, seed=0):
        if temperature == 0:
            return greedy
        assert temperature == 1.0 and len(prompts) == 8
        seeds.append(seed)
        return [t for k in (0, 1) for t in drawn[k]]

    monkeypatch.setattr(scope_sets, "generate_answers", answers)
    vocab = type("V", (), {"eot_ids": [0]})()
    base, own = scope_sets._own_answers(forget, None, None, vocab, {"it", "is", "the", "a"}, [], samples=4, seed=7)
    assert base == {0: greedy[0], 1: greedy[1]} and seeds == [7]
    assert [(i, e.target, sorted(w)) for i, e, w in own] == [
        (0, "It is Hogwarts School.", ["hogwarts"]),  # "school" is the question's
        (0, "It is called Hogwarts.", ["hogwarts"]),
        (1, "Ron, of course.", ["ron"]),
        (1, "Ron Weasley!", ["ron", "weasley"]),
    ]
    _, greedy_only = scope_sets._own_answers(forget, None, None, vocab, {"it", "is", "the", "a"}, [], samples=0)
    assert [e.target for _, e, _ in greedy_only] == ["It is Hogwarts School."] and seeds == [7]
