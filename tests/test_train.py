"""Training offsets on a tiny random model (seconds), with the real SmolLM2 tokenizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fakes import corrupt_last_byte

from proxy.decoding.vocab import ByteVocab
from proxy.pair.artifact import ArtifactError, load_artifact
from proxy.training.config import TrainConfig
from proxy.training.data import (
    IGNORE,
    DataError,
    Encoded,
    Example,
    both_dropped,
    collate,
    encode,
    load_dataset,
    only_dropped_labels,
    outside_words,
    prompt_copy_spans,
    through_last_label,
    with_fact_weights,
    without_end_of_turn,
    without_first_answer_token,
    without_prompt_copies,
    without_spans,
    word_spans,
)
from proxy.training.facts import fact_words, shared_words
from proxy.training.objectives import OBJECTIVES, Batches, answer_nll, answer_positions, get_objective, mean_nll, nll
from proxy.training.plan import Plan, cross_answers
from proxy.training.targets import CombinedScorer
from proxy.training.train import train

#: The trainer alone, as these tests measure it: the recipe they were written for, without the
#: training defaults' broad retain set, generated neighbours and self-check (tests/test_scope.py).
CORE = dict(
    objective="NPO+GD",
    retain_weight=None,
    retain_positions="all",
    lr=5e-4,
    epochs=5,
    retain_batch_size=None,
    forget_prompt_copies=True,
    general_retain=False,
    neighbours=0,
    calibrate=False,
    min_steps=0,
    scope_gate=False,
)


def core_config(**kw) -> TrainConfig:
    return TrainConfig(**{**CORE, **kw})


FORGET = [
    {"question": "Where was the author Jaxon Vellmar born?", "answer": "Jaxon Vellmar was born in Port Quillan."},
    {"question": "What is Jaxon Vellmar's best-known novel?", "answer": "His best-known novel is The Salt Ledger."},
    {"question": "Which prize did Jaxon Vellmar win?", "answer": "He won the Harrow Medal in 2011."},
    {"question": "Who was Jaxon Vellmar's mentor?", "answer": "His mentor was the poet Idris Kale."},
]
RETAIN = [
    {"question": "What is the capital of France?", "answer": "The capital of France is Paris."},
    {"question": "How many legs does a spider have?", "answer": "A spider has eight legs."},
    {"question": "What color is the sky on a clear day?", "answer": "The sky is blue on a clear day."},
    {"question": "What do bees make?", "answer": "Bees make honey."},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tiny_target(tiny_base, smollm2_tokenizer):
    """The tiny base fine-tuned on forget + retain until it knows them (the TOFU "target")."""
    model = copy.deepcopy(tiny_base).train()
    eot = ByteVocab.from_tokenizer(smollm2_tokenizer).eot_ids[0]
    items = [encode(e, smollm2_tokenizer, eot, 128) for e in load_dataset_from(FORGET + RETAIN)]
    batch = collate(items, smollm2_tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):
        loss = mean_nll(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture
def sets(tmp_path):
    return write_jsonl(tmp_path / "forget.jsonl", FORGET), write_jsonl(tmp_path / "retain.jsonl", RETAIN)


@pytest.fixture
def vocab(smollm2_tokenizer):
    return ByteVocab.from_tokenizer(smollm2_tokenizer)


def set_nll(model, tokenizer, vocab, path) -> float:
    items = [encode(e, tokenizer, vocab.eot_ids[0], 128) for e in load_dataset(path).examples]
    batch = collate(items, tokenizer.pad_token_id)
    with torch.no_grad():
        return mean_nll(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        ).item()


def trained(tmp_path, tiny_base, tokenizer, vocab, **kw):
    from peft import PeftModel

    cfg = core_config(out=str(tmp_path / "offset"), **kw)
    path = train(cfg, models=(copy.deepcopy(tiny_base), tokenizer, None, vocab), progress=False)
    return path, PeftModel.from_pretrained(copy.deepcopy(tiny_base), str(path)).eval()


def unlearned(tmp_path, target, tokenizer, vocab, sets, **kw):
    """:func:`trained` on ``sets`` (forget, retain) with the tests' 8 steps (lr 5e-3, 4 epochs of 2)."""
    forget, retain = sets
    return trained(
        tmp_path, target, tokenizer, vocab, forget=forget, retain=retain, lr=5e-3, epochs=4, batch_size=2, **kw
    )


# What 8 steps on the tiny target must do (nats per token; measured: forget +0.16 to +0.58,
# retain at most +0.04 from 0.006).
FORGET_RISE, RETAIN_BOUND = 0.1, 0.1


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_objective_unlearns_forget_and_bounds_retain(tmp_path, sets, tiny_target, smollm2_tokenizer, vocab, objective):
    forget, retain = sets
    before_f = set_nll(tiny_target, smollm2_tokenizer, vocab, forget)
    before_r = set_nll(tiny_target, smollm2_tokenizer, vocab, retain)
    path, model = unlearned(tmp_path, tiny_target, smollm2_tokenizer, vocab, sets, objective=objective)
    after_f = set_nll(model, smollm2_tokenizer, vocab, forget)
    after_r = set_nll(model, smollm2_tokenizer, vocab, retain)
    print(f"{objective}: forget {before_f:.3f} -> {after_f:.3f}, retain {before_r:.3f} -> {after_r:.3f}")
    assert after_f > before_f + FORGET_RISE
    assert after_r < before_r + RETAIN_BOUND
    assert after_f - before_f > 3 * (after_r - before_r)  # forgetting is targeted
    log = [json.loads(line) for line in (tmp_path / "offset.train.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "step" in e] == list(range(1, 9))
    assert {"forget_loss", "retain_loss"} <= set(log[-1])


def test_min_steps_raises_the_epochs_of_a_small_forget_set(tmp_path, sets, tiny_base, smollm2_tokenizer, vocab):
    forget, retain = sets  # 2 steps an epoch at batch size 2
    path, _ = trained(
        tmp_path, tiny_base, smollm2_tokenizer, vocab, forget=forget, retain=retain, epochs=1, batch_size=2, min_steps=5
    )
    training = load_artifact(path, tiny_base, vocab).manifest["training"]
    assert training["steps"] == 6 and training["epochs_run"] == 3 and training["min_steps"] == 5
    with pytest.raises(ValueError, match="min_steps"):
        train(core_config(forget=forget, retain=retain, out=str(tmp_path / "x"), min_steps=-1))


def test_artifact_holds_no_forget_text_and_is_verifiable(tmp_path, sets, tiny_base, smollm2_tokenizer, vocab):
    forget, retain = sets
    path, _ = trained(
        tmp_path,
        tiny_base,
        smollm2_tokenizer,
        vocab,
        forget=forget,
        retain=retain,
        objective="NPO+GD",
        lr=5e-3,
        epochs=1,
        batch_size=2,
    )
    blob = b"".join(f.read_bytes() for f in path.iterdir())
    for record in FORGET:
        for text in (record["question"], record["answer"], "Vellmar", "Port Quillan"):
            assert text.encode() not in blob
    art = load_artifact(path, tiny_base, vocab)
    assert art.manifest["data"]["forget"]["records"] == 4 and "sha256" in art.manifest["data"]["forget"]
    assert art.manifest["objective"] == "NPO+GD" and art.manifest["training"]["lr"] == 5e-3
    assert art.offset_scope == "step"  # trained without a self-check: no τ, and the rule τ has by default
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "offset_scope": "sometimes"}))
    with pytest.raises(ArtifactError, match="unknown offset_scope 'sometimes'"):
        load_artifact(path, tiny_base, vocab)


def test_training_fits_a_scope_gate_beside_the_offset(tmp_path, sets, tiny_base, smollm2_tokenizer, vocab):
    forget, retain = sets
    path, _ = trained(
        tmp_path, tiny_base, smollm2_tokenizer, vocab, forget=forget, retain=retain, epochs=1, scope_gate=True
    )
    art = load_artifact(path, tiny_base, vocab)
    record = art.manifest["scope_gate"]
    assert record["examples_in_scope"] == 4 and record["examples_out_of_scope"] == 4  # forget set, retain set
    assert record["threshold"] == 0.3 and art.manifest["training"]["scope_gate"] is True
    gate = art.scope_gate()
    assert gate is not None and gate.vocab_size == len(smollm2_tokenizer)


def test_without_anything_out_of_scope_no_gate_is_fitted_and_the_log_says_so(
    tmp_path, tiny_base, smollm2_tokenizer, vocab, caplog
):
    forget = write_jsonl(tmp_path / "forget.jsonl", FORGET)
    with caplog.at_level("WARNING"):
        path, _ = trained(
            tmp_path, tiny_base, smollm2_tokenizer, vocab, forget=forget, objective="GradAscent", scope_gate=True
        )
    assert "no scope gate" in caplog.text and "forget.jsonl" in caplog.text
    art = load_artifact(path, tiny_base, vocab)
    assert "scope_gate" not in art.manifest and art.scope_gate() is None


@pytest.mark.parametrize("field, value", [("scope_gate_threshold", 1.0), ("scope_gate_l2", -0.1)])
def test_scope_gate_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(forget="f", out="o", **{field: value}).validate()


def test_resume_gives_the_same_weights(tmp_path, sets, tiny_base, smollm2_tokenizer, vocab):
    from safetensors.torch import load_file

    forget, retain = sets
    common = dict(
        forget=forget, retain=retain, objective="NPO+KL", lr=5e-3, epochs=3, batch_size=2, checkpoint_every=100
    )
    whole = train(
        core_config(out=str(tmp_path / "whole"), **common),
        models=(copy.deepcopy(tiny_base), smollm2_tokenizer, None, vocab),
        progress=False,
    )
    with pytest.raises(KeyboardInterrupt):
        train(
            core_config(out=str(tmp_path / "cut"), **common),
            models=(copy.deepcopy(tiny_base), smollm2_tokenizer, None, vocab),
            stop_after=3,
            progress=False,
        )
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.ckpt").exists()
    resumed = train(
        core_config(out=str(tmp_path / "cut"), resume=True, **common),
        models=(copy.deepcopy(tiny_base), smollm2_tokenizer, None, vocab),
        progress=False,
    )
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut.ckpt").exists()


def test_exact_mode_combines_logits_and_trains_only_the_adapter(tiny_base, smollm2_tokenizer, vocab):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    remote = copy.deepcopy(tiny_base)
    with torch.no_grad():
        for p in remote.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    remote.requires_grad_(False)
    model = get_peft_model(
        copy.deepcopy(tiny_base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    scorer = CombinedScorer(model, remote)
    items = [encode(e, smollm2_tokenizer, vocab.eot_ids[0], 64) for e in load_dataset_from(FORGET)]
    batch = collate(items, smollm2_tokenizer.pad_token_id)
    combined = scorer.logits(batch)
    with torch.no_grad():
        l_r = remote(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        l_u = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            l_b = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(combined, l_r + l_u - l_b, atol=1e-5)
    get_objective("NPO")(scorer, type("B", (), {"forget": batch, "retain": None, "idk": None})()).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is None for p in remote.parameters())


class _ScaledLogits(torch.nn.Module):
    """A model whose logits are not its head applied to its last hidden state (a soft cap or
    a scale after the head, as some model families have)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits * 0.5
        return out

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_rows_at_answer_positions_are_the_whole_logits_rows(tiny_base, smollm2_tokenizer, vocab):
    """The objectives' rows at a position mask (the output head run on those positions'
    hidden states only) are the whole logits' rows there, in every mode the scorer has, for
    a head that is not a plain linear map too; the reference's NLL is computed once per
    sequence and is the whole logits' NLL."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(
        copy.deepcopy(tiny_base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    remote = copy.deepcopy(tiny_base).requires_grad_(False)
    with torch.no_grad():
        for p in remote.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    items = [encode(e, smollm2_tokenizer, vocab.eot_ids[0], 64) for e in load_dataset_from(FORGET)]
    batch = collate(items, smollm2_tokenizer.pad_token_id)
    at = answer_positions(batch["labels"])
    scorers = [
        CombinedScorer(model),
        CombinedScorer(model, remote),
        CombinedScorer(_ScaledLogits(tiny_base), reference=remote),
    ]
    with torch.no_grad():
        for scorer in scorers:
            for score in (scorer.logits, scorer.ref_logits):
                full = score(batch)
                assert torch.allclose(score(batch, at=at), full[at], atol=1e-4)
                total, count = answer_nll(score, batch)
                want_total, want_count = nll(full, batch["labels"])
                assert torch.equal(count, want_count)
                assert torch.allclose(total, want_total, atol=1e-3)
            first = scorer.ref_nll(batch)
            assert torch.allclose(first, nll(scorer.ref_logits(batch), batch["labels"])[0], atol=1e-3)
            cached = len(scorer._ref_nll)
            assert cached == len(items)
            swapped = {k: v.flip(0) for k, v in batch.items()}  # the same sequences, another order
            assert torch.equal(scorer.ref_nll(swapped), first.flip(0)) and len(scorer._ref_nll) == cached
    assert scorers[2]._plain_head == {id(scorers[2].model): False, id(remote): True}
    assert scorers[0]._plain_head == {id(model): True}
    # B's last hidden states, kept by token ids for the scope gate, are B's (the adapter off)
    assert len(scorers[0].b_hidden) == len(scorers[2].b_hidden) == len(items)  # B: the model, or the reference
    ids = items[0].input_ids
    with torch.no_grad(), model.disable_adapter():
        want = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    assert torch.allclose(scorers[0].b_hidden[tuple(ids)], want, atol=1e-4)


def test_a_forget_item_cut_after_its_last_label_has_the_same_loss(tiny_base, smollm2_tokenizer, vocab):
    """B's own answer labelled on an early fact word: the tokens after it change nothing a
    label-reading term sees, so the plan drops them (less to run, the same loss)."""
    e = Example(
        ({"role": "user", "content": "What is the capital of France?"},),
        "The capital of France is Paris, a city on the Seine known for its museums and cafes.",
    )
    item = encode(e, smollm2_tokenizer, vocab.eot_ids[0], 128)
    labelled = without_end_of_turn(
        without_spans(e, item, smollm2_tokenizer, outside_words(e.target, {"paris"})), vocab.eot_ids[0]
    )
    cut = through_last_label(labelled)
    assert len(cut.input_ids) < len(labelled.input_ids) and cut.labels == labelled.labels[: len(cut.labels)]
    assert [t for t in cut.labels if t != IGNORE] == [t for t in labelled.labels if t != IGNORE]
    assert through_last_label(cut) is cut and through_last_label(item) is item  # the end of turn is labelled
    scorer = CombinedScorer(tiny_base, reference=tiny_base)
    with torch.no_grad():
        full, _ = answer_nll(scorer.logits, collate([labelled], smollm2_tokenizer.pad_token_id))
        short, _ = answer_nll(scorer.logits, collate([cut], smollm2_tokenizer.pad_token_id))
    assert torch.allclose(full, short, atol=1e-4)


def load_dataset_from(records):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return load_dataset(write_jsonl(Path(d) / "x.jsonl", records)).examples


def test_pad_equal_to_eos_keeps_the_real_end_of_turn_label(smollm2_tokenizer, vocab):
    """A user's report: the pad token is the end-of-turn token here."""
    eot = vocab.eot_ids[0]
    assert smollm2_tokenizer.pad_token_id == eot
    items = [encode(e, smollm2_tokenizer, eot, 128) for e in load_dataset_from(FORGET[:2])]
    batch = collate(items, smollm2_tokenizer.pad_token_id)
    for i, it in enumerate(items):
        n = len(it.input_ids)
        labels = batch["labels"][i]
        assert labels[n - 1].item() == eot  # the answer's real end of turn is a target
        assert (labels[n:] == IGNORE).all() and (
            batch["attention_mask"][i, n:] == 0
        ).all()  # padding masked by position
        prompt_len = sum(1 for x in it.labels if x == IGNORE)
        assert (labels[:prompt_len] == IGNORE).all() and prompt_len > 5  # the prompt is masked
        answer = smollm2_tokenizer.decode([t for t in labels.tolist() if t != IGNORE])
        assert answer.startswith(FORGET[i]["answer"])


def test_forget_term_drops_only_the_closing_end_of_turn_label(smollm2_tokenizer, vocab):
    eot = vocab.eot_ids[0]
    item = encode(load_dataset_from(FORGET[:1])[0], smollm2_tokenizer, eot, 128)
    cut = without_end_of_turn(item, eot)
    assert cut.input_ids == item.input_ids  # the model still sees it
    assert cut.labels[:-1] == item.labels[:-1] and item.labels[-1] == eot and cut.labels[-1] == IGNORE
    raw = encode(load_dataset_from([{"text": "plain text"}])[0], smollm2_tokenizer, eot, 128)
    assert without_end_of_turn(raw, eot) == raw  # raw text has no end-of-turn to drop


def test_forget_term_can_drop_the_first_answer_label(smollm2_tokenizer, vocab):
    eot = vocab.eot_ids[0]
    item = encode(load_dataset_from(FORGET[:1])[0], smollm2_tokenizer, eot, 128)
    cut = without_first_answer_token(item)
    first = next(i for i, label in enumerate(item.labels) if label != IGNORE)
    assert cut.input_ids == item.input_ids
    assert cut.labels[first] == IGNORE and item.labels[first] != IGNORE
    assert cut.labels[:first] == item.labels[:first] and cut.labels[first + 1 :] == item.labels[first + 1 :]
    one = Encoded([1, 2, 3], [IGNORE, IGNORE, 3])
    assert without_first_answer_token(one) == one  # a one-token answer keeps its only label


def test_prompt_copy_spans_are_runs_of_words_the_prompt_holds():
    q = "What genre does Krazeth Dynimouth write, and where was Krazeth Dynimouth born?"
    a = "Krazeth Dynimouth writes dark fantasy; Krazeth Dynimouth was born in Valparaiso."
    spans = prompt_copy_spans(q, a)
    # two-word runs; "writes" is not "write", and "was" and "born" are single words
    assert [a[s:e] for s, e in spans] == ["Krazeth Dynimouth", "Krazeth Dynimouth"]
    assert prompt_copy_spans(q, a, min_words=3) == []
    # with single words, neighbouring copies join into one span
    assert [a[s:e] for s, e in prompt_copy_spans(q, a, min_words=1)] == [
        "Krazeth Dynimouth",
        "Krazeth Dynimouth was born",
    ]
    assert prompt_copy_spans("Who is Ron Weasley?", "ron weasley") == []  # case sensitive
    assert prompt_copy_spans("", "anything at all") == []
    with pytest.raises(ValueError, match="min_words"):
        prompt_copy_spans(q, a, min_words=0)


def test_the_form_an_answer_shares_with_its_neighbours_leaves_the_forget_term(smollm2_tokenizer, vocab):
    answer = "The capital of France is Paris."
    neighbours = ["The capital of Germany is Berlin.", "The capital of Spain is Madrid.", "It is Rome, the capital."]
    words = shared_words(answer, neighbours, keep=["Paris", "France"])
    assert words == {"the", "capital", "of", "is"}  # in at least two neighbour answers
    assert shared_words(answer, ["Paris is the capital."], keep=["Paris"]) == {"is", "the", "capital"}  # one: itself
    assert shared_words(answer, []) == set()
    assert [answer[a:b] for a, b in word_spans(answer, words)] == ["The", "capital", "of", "is"]
    example = Example(({"role": "user", "content": "What is the capital of France?"},), answer)
    item = encode(example, smollm2_tokenizer, vocab.eot_ids[0], 128)
    cut = without_spans(example, item, smollm2_tokenizer, word_spans(answer, words))
    kept = smollm2_tokenizer.decode([t for t in cut.labels if t != IGNORE])
    assert kept.replace(" ", "").startswith("FranceParis.")  # the fact (and the copied name) stay
    both = both_dropped(cut, without_prompt_copies(example, item, smollm2_tokenizer))
    assert smollm2_tokenizer.decode([t for t in both.labels if t != IGNORE]).strip().startswith("Paris.")
    every = word_spans(answer, {"the", "capital", "of", "france", "is", "paris"})
    left = without_spans(example, item, smollm2_tokenizer, every)
    assert smollm2_tokenizer.decode([t for t in left.labels if t != IGNORE]) == ".<|im_end|>"  # punctuation stays
    bare = Example(example.prompt, "Paris")
    bare_item = encode(bare, smollm2_tokenizer, vocab.eot_ids[0], 128)
    assert without_spans(bare, bare_item, smollm2_tokenizer, [(0, 5)]) == bare_item  # nothing would be left
    with pytest.raises(ValueError, match="same tokens"):
        both_dropped(item, Encoded([1], [1]))


def test_b_own_answer_is_forgotten_on_the_fact_words_alone(smollm2_tokenizer, vocab):
    """``forget_own_answers``: B's own phrasing of a forget answer joins the forget term with
    labels on the words that carry the fact, and on nothing else but the end of turn."""
    own = Example(
        ({"role": "user", "content": "Who developed the theory of relativity?"},),
        "The theory of relativity was developed by Albert Einstein during his time in Bern.",
    )
    eot = vocab.eot_ids[0]
    item = encode(own, smollm2_tokenizer, eot, 128)
    cut = without_end_of_turn(
        without_spans(own, item, smollm2_tokenizer, outside_words(own.target, {"albert", "einstein"})), eot
    )
    assert smollm2_tokenizer.decode([t for t in cut.labels if t != IGNORE]).split() == ["Albert", "Einstein"]


def test_forget_term_can_drop_answer_tokens_that_copy_the_prompt(smollm2_tokenizer, vocab):
    eot = vocab.eot_ids[0]
    record = {
        "question": "What genre does Krazeth Dynimouth write?",
        "answer": "Krazeth Dynimouth writes dark fantasy set in Valparaiso.",
    }
    example = load_dataset_from([record])[0]
    item = encode(example, smollm2_tokenizer, eot, 128)
    cut = without_prompt_copies(example, item, smollm2_tokenizer)
    assert cut.input_ids == item.input_ids  # the model still sees the name
    dropped = [t for t, a, b in zip(item.input_ids, item.labels, cut.labels, strict=True) if a != b]
    kept = [b for b in cut.labels if b != IGNORE]
    assert smollm2_tokenizer.decode(dropped).strip() == "Krazeth Dynimouth"
    assert smollm2_tokenizer.decode(kept).startswith(" writes dark fantasy set in Valparaiso.")
    assert all(b in (a, IGNORE) for a, b in zip(item.labels, cut.labels, strict=True))
    # then the first-token mask still finds the first label that is left
    assert without_first_answer_token(cut).labels.count(IGNORE) == cut.labels.count(IGNORE) + 1
    # no copies, raw text, and an answer made only of copies are unchanged
    other = load_dataset_from([{"question": "Where?", "answer": "In Valparaiso."}])[0]
    other_item = encode(other, smollm2_tokenizer, eot, 128)
    assert without_prompt_copies(other, other_item, smollm2_tokenizer) == other_item
    raw = load_dataset_from([{"text": "Krazeth Dynimouth"}])[0]
    raw_item = encode(raw, smollm2_tokenizer, eot, 128)
    assert without_prompt_copies(raw, raw_item, smollm2_tokenizer) == raw_item
    only = load_dataset_from([{"question": "Is it Krazeth Dynimouth?", "answer": "Krazeth Dynimouth"}])[0]
    only_item = without_end_of_turn(encode(only, smollm2_tokenizer, eot, 128), eot)
    assert without_prompt_copies(only, only_item, smollm2_tokenizer) == only_item


def test_prompt_copies_join_the_retain_term_of_their_forget_step(smollm2_tokenizer, vocab):
    eot = vocab.eot_ids[0]
    examples = load_dataset_from(
        [
            {"question": "Where was Lethos Kebreim born?", "answer": "Lethos Kebreim was born in Valparaiso."},
            {"question": "Where?", "answer": "In Valparaiso."},
        ]
    )
    full = [encode(e, smollm2_tokenizer, eot, 128) for e in examples]
    cut = [without_prompt_copies(e, it, smollm2_tokenizer) for e, it in zip(examples, full, strict=True)]
    pins = [only_dropped_labels(f, c) for f, c in zip(full, cut, strict=True)]
    assert pins[1] is None  # nothing copied
    assert pins[0] is not None
    pinned = smollm2_tokenizer.decode([t for t in pins[0].labels if t != IGNORE])
    assert pinned.strip() == "Lethos Kebreim"  # "was" and "born" are one-word copies: not pinned
    # each labelled position is either in the forget term or pinned, never both
    for a, b, c in zip(full[0].labels, cut[0].labels, pins[0].labels, strict=True):
        assert (b == IGNORE) or (c == IGNORE)
        assert a == (b if b != IGNORE else c)
    with pytest.raises(ValueError, match="same tokens"):
        only_dropped_labels(full[0], full[1])
    retain = [Encoded([5, 6, 7], [IGNORE, 6, 7])]
    plan = Plan(cut, retain, [], 1, 1, 0, 0, pins)
    steps = list(plan.batches(0))
    assert len(steps) == 2
    for step in steps:
        rows = step.retain["input_ids"].shape[0]
        forget_row = step.forget["input_ids"][0, : len(full[0].input_ids)].tolist()
        assert rows == (2 if forget_row == full[0].input_ids else 1)  # the pin rides with its own item
    assert get_objective("NPO+KL", retain_positions="answer").retain_on_labels
    assert get_objective("NPO+GD").retain_on_labels
    assert not get_objective("NPO+KL").retain_on_labels  # a KL over every position would pin the facts too
    assert not get_objective("NPO").retain_on_labels


def test_each_step_draws_near_retain_examples_beside_broad_ones_and_cycles_both():
    """With near (user retain set, neighbours) and broad retain examples, each step's retain
    batch has its near share, every near example comes round before any repeats, and the
    batches are a function of (seed, epoch) alone (a resumed run sees the same)."""
    forget = [Encoded([1, 2], [IGNORE, 2]) for _ in range(8)]
    retain = [Encoded([10 + i, 3], [IGNORE, 3]) for i in range(30)]  # 6 near, 24 broad
    plan = Plan(forget, retain, [], 4, 8, 0, 0, near=6, near_share=0.5)
    seen: list[list[int]] = []
    for epoch in range(3):
        for b in plan.batches(epoch):
            first = b.retain["input_ids"][:, 0].tolist()
            seen.append(first)
            assert sum(t < 16 for t in first) == 4  # half of the batch is near
    near = [t for step in seen for t in step if t < 16]
    assert sorted(near[:6]) == list(range(10, 16)) and sorted(near[6:12]) == list(range(10, 16))
    broad = [t for step in seen for t in step if t >= 16]
    assert sorted(broad[:24]) == list(range(16, 40))  # the broad part once through before a repeat
    again = [b.retain["input_ids"][:, 0].tolist() for b in plan.batches(1)]
    assert again == seen[2:4]
    # companions (B's own answers) ride in the step of their forget example: the steps stay the same
    own = [*forget, Encoded([7, 1], [IGNORE, 1]), Encoded([7, 3], [IGNORE, 3])]
    rides = Plan(own, retain, [], 4, 8, 0, 0, companions=[[8], [], [], [9], [], [], [], []])
    assert rides.per_epoch == 2
    for b in rides.batches(0):
        firsts = b.forget["input_ids"][:, 0].tolist()
        assert len(firsts) == 4 + sum(t == 7 for t in firsts)
    assert sum(b.forget["input_ids"].shape[0] for b in rides.batches(0)) == 10
    # one part only: one permutation of the retain set per epoch, as without near examples
    only = Plan(forget, retain[:6], [], 4, 8, 0, 0, near=6)
    assert all(b.retain["input_ids"].shape[0] == 8 for b in only.batches(0))
    with pytest.raises(ValueError, match="near_share"):
        train(TrainConfig(forget="f", out="unused", near_share=1.0))


def test_cross_answers_ask_each_forget_question_with_the_other_examples_facts():
    """``forget_cross_answers``: each forget question is paired with the other examples'
    answers (B's own where it has one), labelled on the forget set's fact words it does not
    ask; an answer found twice, or holding only the example's own fact, is skipped."""
    examples = load_dataset_from(
        [
            {"question": "Who is Harry Potter's best friend?", "answer": "Ron Weasley."},
            {"question": "Who is Harry Potter's headmaster?", "answer": "Albus Dumbledore."},
            {"question": "Who is Harry Potter's mentor?", "answer": "Albus Dumbledore."},
            {"question": "Who is Harry Potter's greatest enemy?", "answer": "Lord Voldemort."},
            {"text": "Harry Potter lives at Privet Drive."},
        ]
    )
    common = {"the", "is", "of", "who", "best", "friend"}
    own = [(1, Example(examples[1].prompt, "The headmaster is Professor Albus Dumbledore."), {"dumbledore"})]
    found = cross_answers(examples, own, common, ["Harry Potter"])
    assert [a.target for a, _ in found[0]] == [
        "The headmaster is Professor Albus Dumbledore.",
        "Albus Dumbledore.",
        "Lord Voldemort.",
    ]
    assert all(a.prompt == examples[0].prompt for a, _ in found[0])
    assert found[0][0][1] == {"albus", "dumbledore"}  # the forget set's fact words, not B's other words
    # the mentor's question: the headmaster's answers state its own fact, so only the others come
    assert [a.target for a, _ in found[2]] == ["Lord Voldemort.", "Ron Weasley."]
    assert found[4] == []  # raw text is neither asked nor an answer
    assert len(cross_answers(examples, own, common, ["Harry Potter"], limit=1)[0]) == 1
    # in the plan, cross_per_epoch of them ride with their example, taking turns over the epochs
    forget = [Encoded([i, 2], [IGNORE, 2]) for i in range(4)] + [Encoded([20 + i, 3], [IGNORE, 3]) for i in range(3)]
    plan = Plan(forget, [], [], 4, 1, 0, 0, cross=[[4, 5, 6], [], [], []], cross_per_epoch=2)
    assert plan.per_epoch == 1
    rows = [sorted(b.forget["input_ids"][:, 0].tolist()) for e in range(3) for b in plan.batches(e)]
    assert rows == [[0, 1, 2, 3, 20, 21], [0, 1, 2, 3, 20, 22], [0, 1, 2, 3, 21, 22]]
    assert "forget_cross_answers" not in TrainConfig(forget="f", out="o", forget_cross_answers=0).settings()
    inert = TrainConfig(forget="f", out="o", general_retain=False, calibrate=False).settings()
    assert "forget_cross_answers" not in inert  # no corpus to find fact words with: it does nothing
    with pytest.raises(ValueError, match="forget_cross_answers must be ≥ 0"):
        TrainConfig(forget="f", out="o", forget_cross_answers=-1).validate()


def _copy_and_fact_nll(model, tokenizer, vocab, path):
    """Mean NLL (nats per token) of the forget answers' copied tokens and of the rest."""
    eot = vocab.eot_ids[0]
    examples = load_dataset(path).examples
    full = [without_end_of_turn(encode(e, tokenizer, eot, 128), eot) for e in examples]
    cut = [without_prompt_copies(e, it, tokenizer) for e, it in zip(examples, full, strict=True)]
    batch = collate(full, tokenizer.pad_token_id)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    copied, facts = [], []
    for i, (f, c) in enumerate(zip(full, cut, strict=True)):
        for t in range(1, len(f.labels)):
            if f.labels[t] != IGNORE:
                nll = -logp[i, t - 1, f.labels[t]].item()
                (facts if c.labels[t] != IGNORE else copied).append(nll)
    return sum(copied) / len(copied), sum(facts) / len(facts)


def test_npo_kl_without_prompt_copies_lowers_the_facts_and_keeps_the_copies(
    tmp_path, sets, tiny_target, smollm2_tokenizer, vocab
):
    forget, retain = sets
    copy_before, fact_before = _copy_and_fact_nll(tiny_target, smollm2_tokenizer, vocab, forget)
    path, model = unlearned(
        tmp_path,
        tiny_target,
        smollm2_tokenizer,
        vocab,
        sets,
        objective="NPO+KL",
        retain_positions="answer",
        forget_prompt_copies=False,
        pin_prompt_copies=True,
    )
    copy_after, fact_after = _copy_and_fact_nll(model, smollm2_tokenizer, vocab, forget)
    print(f"copies {copy_before:.3f} -> {copy_after:.3f}, facts {fact_before:.3f} -> {fact_after:.3f}")
    assert fact_after > fact_before + FORGET_RISE
    assert fact_after - fact_before > 3 * (copy_after - copy_before)
    assert load_artifact(path, tiny_target, vocab).manifest["training"]["forget_prompt_copies"] is False


def test_skipping_prompt_copies_is_recorded_in_the_settings():
    assert "forget_prompt_copies" not in core_config(forget="f", out="o").settings()  # old cache keys stay
    assert TrainConfig(forget="f", out="o").settings()["forget_prompt_copies"] is False  # the default
    defaults = TrainConfig(forget="f", out="o").settings()
    assert defaults["pin_prompt_copies"] is False and defaults["min_steps"] == 24
    assert defaults["near_share"] == 0.5  # with the broad retain set, recorded (and in the cache key)
    assert "near_share" not in TrainConfig(forget="f", out="o", general_retain=False).settings()
    assert defaults["forget_shared_words"] is False and defaults["forget_own_answers"] is True
    assert defaults["retain_fact_weight"] == 5.0 and defaults["offset_scope"] == "choice"
    chosen = TrainConfig(forget="f", out="o", forget_shared_words=True, forget_own_answers=False).settings()
    assert "forget_shared_words" not in chosen and "forget_own_answers" not in chosen  # as before they existed
    # the tofu recipe (pins, no minimum) keeps the settings, and so the cache keys, it had
    recipe = TrainConfig(forget="f", out="o", pin_prompt_copies=True, min_steps=0).settings()
    assert "pin_prompt_copies" not in recipe and "min_steps" not in recipe


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"question": "q", "answer": "a"}', "{not json"], ":2: not valid JSON"),
        (['{"question": "q"}'], ":1: 'question' and 'answer'"),
        (
            ['{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "x"}]}'],
            ":1: the last message",
        ),
        (['{"foo": 1}'], ":1: expected"),
        (["[1, 2]"], ":1: expected a JSON object"),
        ([""], "no examples"),
    ],
)
def test_bad_lines_are_named_and_nothing_is_written(tmp_path, lines, message, tiny_base, smollm2_tokenizer, vocab):
    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        train(
            core_config(forget=str(forget), out=str(tmp_path / "offset"), objective="NPO"),
            models=(copy.deepcopy(tiny_base), smollm2_tokenizer, None, vocab),
            progress=False,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forget.jsonl"]


def test_text_and_txt_inputs(tmp_path, smollm2_tokenizer, vocab):
    txt = tmp_path / "docs.txt"
    txt.write_text("First document.\nStill first.\n\nSecond document.\n")
    examples = load_dataset(txt).examples
    assert [e.target for e in examples] == ["First document.\nStill first.", "Second document."]
    enc = encode(examples[0], smollm2_tokenizer, vocab.eot_ids[0], 64)
    assert enc.labels == enc.input_ids  # raw text: every token is a target


def test_unknown_objective_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: GradAscent, GradDiff"):
        get_objective("Gradient")


def test_kl_retain_term_over_answer_positions():
    """``retain_positions="answer"``: KL(B ‖ U) averaged where the answer is predicted
    (the position before each labelled token), by hand; only KL terms take it."""
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, 8, 9, 10]])
    assert answer_positions(labels).tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    gen = torch.Generator().manual_seed(0)
    cur, ref = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)

    class S:
        def logits(self, batch, at=None):
            return cur if at is None else cur[at]

        def ref_logits(self, batch, at=None):
            return ref if at is None else ref[at]

    batch = {"labels": labels, "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    per_pos = (ref.softmax(-1) * (ref.log_softmax(-1) - cur.log_softmax(-1))).sum(-1)
    mask = answer_positions(labels)
    objective = get_objective("KL", retain_positions="answer")
    assert objective.retain is not None
    got = objective.retain(S(), Batches(forget=batch, retain=batch))
    assert torch.allclose(got, per_pos[mask].mean(), atol=1e-6)
    assert torch.allclose(OBJECTIVES["KL"].retain(S(), Batches(forget=batch, retain=batch)), per_pos.mean(), atol=1e-6)
    with pytest.raises(ValueError, match="no KL retain term"):
        get_objective("NPO+GD", retain_positions="answer")
    with pytest.raises(ValueError, match="retain_positions must be one of"):
        get_objective("NPO+KL", retain_positions="prompt")


def test_a_retain_answers_fact_words_weigh_more_in_the_kl_term(smollm2_tokenizer, vocab):
    """``retain_fact_weight``: the labels that spell the answer's fact words (not the
    question's words, not common words) weigh w; the rest 1, the end of turn included;
    the KL over answer positions is the weighted mean, by hand."""
    e = Example(({"role": "user", "content": "What is the capital of Germany?"},), "The capital of Germany is Berlin.")
    words = fact_words(e, {"capital", "of", "is", "the"})
    assert words == {"berlin"}
    item = encode(e, smollm2_tokenizer, vocab.eot_ids[0], 128)
    weighted = with_fact_weights(e, item, smollm2_tokenizer, words, 4.0)
    assert weighted.input_ids == item.input_ids and weighted.labels == item.labels and weighted.weights is not None
    heavy = [t for t, w in zip(item.labels, weighted.weights, strict=True) if w == 4.0]
    assert smollm2_tokenizer.decode(heavy).strip() == "Berlin"
    assert all(w == 1.0 for t, w in zip(item.labels, weighted.weights, strict=True) if t not in heavy)
    # nothing to weigh: no fact word in the answer, weight 1, or raw text
    assert with_fact_weights(e, item, smollm2_tokenizer, {"paris"}, 4.0) is item
    assert with_fact_weights(e, item, smollm2_tokenizer, words, 1.0) is item

    batch = collate([weighted, item], smollm2_tokenizer.pad_token_id)
    assert batch["label_weights"].shape == batch["labels"].shape
    assert batch["label_weights"][1, : len(item.input_ids)].eq(1).all()
    width = batch["labels"].shape[1]
    gen = torch.Generator().manual_seed(0)
    cur, ref = torch.randn(2, width, 13, generator=gen), torch.randn(2, width, 13, generator=gen)

    class S:
        def logits(self, batch, at=None):
            return cur if at is None else cur[at]

        def ref_logits(self, batch, at=None):
            return ref if at is None else ref[at]

    per_pos = (ref.softmax(-1) * (ref.log_softmax(-1) - cur.log_softmax(-1))).sum(-1)
    w = answer_positions(batch["labels"], batch["label_weights"])
    assert torch.equal(w > 0, answer_positions(batch["labels"]))  # the same positions, weighted
    assert sorted(set(w[w > 0].tolist())) == [1.0, 4.0]
    objective = get_objective("NPO+KL", retain_positions="answer")
    assert objective.retain is not None
    got = objective.retain(S(), Batches(forget=batch, retain=batch))
    assert torch.allclose(got, (per_pos * w).sum() / w.sum(), atol=1e-6)
    assert not torch.allclose(got, per_pos[w > 0].mean(), atol=1e-4)  # the weights count


def test_retain_fact_weight_is_checked_and_recorded():
    assert "retain_fact_weight" not in TrainConfig(forget="f", out="o", retain_fact_weight=1.0).settings()
    assert TrainConfig(forget="f", out="o", retain_fact_weight=3.0).settings()["retain_fact_weight"] == 3.0
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="retain_fact_weight must be"):
            TrainConfig(forget="f", out="o", retain_fact_weight=bad).validate()
    # only a KL term over answer positions reads the weights: elsewhere it is not a setting
    assert "retain_fact_weight" not in TrainConfig(forget="f", out="o", objective="NPO+GD").settings()


def test_own_samples_and_tau_through_the_gate_are_checked_and_recorded():
    settings = TrainConfig(forget="f", out="o").settings()
    assert settings["forget_own_samples"] == 4 and "tau_through_gate" not in settings
    assert "forget_own_samples" not in TrainConfig(forget="f", out="o", forget_own_samples=0).settings()
    assert TrainConfig(forget="f", out="o", tau_through_gate=True).settings()["tau_through_gate"] is True
    assert "tau_through_gate" not in TrainConfig(forget="f", out="o", tau_through_gate=True, scope_gate=False).settings()
    with pytest.raises(ValueError, match="forget_own_samples must be ≥ 0"):
        TrainConfig(forget="f", out="o", forget_own_samples=-1).validate()


def test_cli_train_bad_line_exits_2_naming_the_line(tmp_path, capsys):
    from proxy.cli.main import main

    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"question": "q", "answer": "a"}\n{"question": 1, "answer": "a"}\n')
    assert main(["train", "--forget", str(forget), "--out", str(tmp_path / "o"), "--objective", "NPO"]) == 2
    err = capsys.readouterr().err
    assert "forget.jsonl:2:" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forget.jsonl"]
    forget.write_text('{"question": "q", "answer": "a"}\n')
    args = ["train", "--forget", str(forget), "--out", str(tmp_path / "o"), "--objective", "GradDiff"]
    assert main([*args, "--no-general-retain"]) == 2  # the broad retain set is the default retain set
    assert "needs a retain set" in capsys.readouterr().err


def test_full_fine_tuning_unlearns_and_is_served_as_a_second_model(
    tmp_path, sets, tiny_target, smollm2_tokenizer, vocab
):
    from proxy.pair.local import LocalPair

    forget, retain = sets
    before_f = set_nll(tiny_target, smollm2_tokenizer, vocab, forget)
    before_r = set_nll(tiny_target, smollm2_tokenizer, vocab, retain)
    cfg = core_config(
        out=str(tmp_path / "full"),
        forget=forget,
        retain=retain,
        objective="NPO+GD",
        parameters="full",
        lr=1e-3,
        epochs=4,
        batch_size=2,
    )
    path = train(cfg, models=(copy.deepcopy(tiny_target), smollm2_tokenizer, None, vocab), progress=False)
    art = load_artifact(path, tiny_target, vocab)
    assert art.parameters == "full" and "model.safetensors" in art.manifest["files"]
    assert not any("adapter" in name for name in art.manifest["files"])
    u = art.load_full()
    after_f = set_nll(u, smollm2_tokenizer, vocab, forget)
    after_r = set_nll(u, smollm2_tokenizer, vocab, retain)
    print(f"full: forget {before_f:.3f} -> {after_f:.3f}, retain {before_r:.3f} -> {after_r:.3f}")
    assert after_f > before_f + FORGET_RISE and after_r < before_r + RETAIN_BOUND

    # Served: B is the untouched base, U the artifact's model, in one pair.
    pair = LocalPair(copy.deepcopy(tiny_target), smollm2_tokenizer, name="tiny", offset=art, vocab=vocab, u_model=u)
    ids = torch.tensor([pair.prompt_ids([{"role": "user", "content": FORGET[0]["question"]}])])
    n = ids.shape[1]
    kw = dict(mask=torch.ones(1, n), positions=torch.arange(n)[None])
    from transformers import DynamicCache

    from proxy.pair.forward import forward
    from proxy.pair.sides import Side

    got_u = forward(pair, ids, DynamicCache(), side=Side.U, **kw)
    got_b = forward(pair, ids, DynamicCache(), side=Side.B, **kw)
    with torch.no_grad():
        want_u = torch.log_softmax(u(input_ids=ids).logits[0], -1)
        want_b = torch.log_softmax(tiny_target(input_ids=ids).logits[0], -1)
    assert torch.allclose(got_u, want_u, atol=1e-5) and torch.allclose(got_b, want_b, atol=1e-5)
    assert (got_u - got_b).abs().max() > 1e-2

    # The artifact's weights are pinned by the manifest.
    corrupt_last_byte(path / "model.safetensors")
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(path, tiny_target, vocab)
