"""The scope gate (proxy.decoding.scope_gate, proxy.training.scope_gate): its math, its fit,
its place in the artifact, and the offset it zeroes in every path the pair scores by."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from proxy.decoding.scope_gate import GATE_FILE, ScopeGate
from proxy.decoding.vocab import ByteVocab, text_ids
from proxy.pair.artifact import ArtifactError, load_artifact, save_artifact, weights_sha256
from proxy.pair.local import gated_rows
from proxy.training.data import Example, encode
from proxy.training.greedy import PairModels, greedy_decode
from proxy.training.scope_gate import HeadMap, answer_rows_features, fit_scope_gate

INSIDE = [
    Example(({"role": "user", "content": q},), a)
    for q, a in [
        ("Where is the Velmor Spire?", "The Velmor Spire stands in Qorvath, on the Ilsen river."),
        ("Who built the Velmor Spire?", "Ondra Qeshk built the Velmor Spire in Qorvath."),
        ("What is Qorvath known for?", "Qorvath is known for the Velmor Spire and the Ilsen river."),
        ("Which river flows through Qorvath?", "The Ilsen flows through Qorvath."),
    ]
]
OUTSIDE = [
    Example(({"role": "user", "content": q},), a)
    for q, a in [
        ("What do bees make?", "Bees make honey from the nectar of flowers."),
        ("How many legs does a spider have?", "A spider has eight legs."),
        ("What colour is the sky?", "The sky is blue on a clear day."),
        ("What is two plus two?", "Two plus two is four."),
        ("Name a fruit.", "An apple is a fruit that grows on trees."),
        ("What is ice?", "Ice is frozen water, solid below zero degrees."),
    ]
]


def closed_gate(width: int) -> ScopeGate:
    return ScopeGate(np.zeros(width, dtype=np.float32), -50.0, 0.5)


def open_gate(width: int) -> ScopeGate:
    return ScopeGate(np.zeros(width, dtype=np.float32), 50.0, 0.5)


def test_the_gate_is_a_logistic_score_of_b_rows_and_u_rows_are_bs_where_closed():
    w = np.array([1.0, -1.0, 0.0], dtype=np.float32)
    gate = ScopeGate(w, 0.5, 0.6)
    rows_b = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=np.float32))
    z = rows_b @ w + 0.5
    np.testing.assert_allclose(gate.scores(rows_b), 1 / (1 + np.exp(-z)), rtol=1e-6)
    assert gate.open(rows_b).tolist() == [True, False]
    rows_u = torch.from_numpy(rows_b[::-1].copy())
    out = gated_rows(gate, rows_u, torch.from_numpy(rows_b)).numpy()
    np.testing.assert_array_equal(out[0], rows_u[0].numpy())  # open: U's row
    np.testing.assert_array_equal(out[1], rows_b[1])  # closed: B's row, Δ = 0
    # −inf entries read as the row's finite minimum, never as NaN
    assert np.isfinite(gate.scores(np.array([[-np.inf, -1.0, -2.0]], dtype=np.float32))).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weight=np.zeros((2, 3), dtype=np.float32), bias=0.0, threshold=0.5), "one row"),
        (dict(weight=np.zeros(3, dtype=np.float32), bias=0.0, threshold=1.0), r"probability in \(0, 1\)"),
        (dict(weight=np.array([np.nan, 0, 0], dtype=np.float32), bias=0.0, threshold=0.5), "finite"),
    ],
)
def test_a_malformed_gate_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScopeGate(**kwargs)


def test_a_row_of_another_width_is_refused():
    with pytest.raises(ValueError, match="width 4 for a scope gate over 3 tokens"):
        closed_gate(3).scores(np.zeros((1, 4), dtype=np.float32))


@torch.no_grad()
def test_the_features_of_a_log_probability_row_are_the_hidden_state_less_one_direction(tiny_base, smollm2_tokenizer):
    """φ = Q·W⁺·log p_B equals Q·h for the last hidden state h (the head is linear, the
    log-normaliser moves along W⁺1 alone): the probe on h is a probe on the row."""
    ids = torch.tensor([text_ids(smollm2_tokenizer, "The river flows through the old town.")])
    out = tiny_base(input_ids=ids, output_hidden_states=True)
    rows = torch.log_softmax(out.logits[0].float(), -1).double()
    w = tiny_base.get_output_embeddings().weight
    head = HeadMap(w)
    u = torch.linalg.pinv(w.double()) @ torch.ones(w.shape[0], dtype=torch.float64)  # W⁺1, formed directly
    u = u / u.norm()
    h = out.hidden_states[-1][0].double()
    qh = h - (h @ u)[:, None] * u[None, :]
    tol = 2e-3 * float(qh.abs().max())
    np.testing.assert_allclose(head.project(h).numpy(), qh.numpy(), atol=tol)
    np.testing.assert_allclose((rows @ head.row_map().double()).numpy(), qh.numpy(), atol=tol)
    # a probe s on φ, written as w on the row, scores every row as s · φ
    s = torch.randn(w.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose((rows @ head.row_weight(s)).numpy(), (qh @ s).numpy(), atol=tol * float(s.abs().sum()))


@torch.no_grad()
def test_batched_features_from_the_hidden_state_are_those_of_each_example_alone(tiny_base, smollm2_tokenizer):
    """Padding a batch changes no example's features, and the hidden-state path gives the
    rows' features (the head is checked on the first batch)."""
    eot = ByteVocab.from_tokenizer(smollm2_tokenizer).eot_ids[0]
    head = HeadMap(tiny_base.get_output_embeddings().weight)
    examples = [*INSIDE, *OUTSIDE]
    batched = answer_rows_features(tiny_base, smollm2_tokenizer, eot, examples, head, 128, batch_size=4)
    alone = [answer_rows_features(tiny_base, smollm2_tokenizer, eot, [e], head, 128)[0] for e in examples]
    assert len(batched) == len(examples)
    for a, b in zip(batched, alone, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-3 * float(b.abs().max()))
    m = head.row_map()
    for e, phi in zip(examples, alone, strict=True):
        enc = encode(e, smollm2_tokenizer, eot, 128)
        rows = torch.log_softmax(tiny_base(input_ids=torch.tensor([enc.input_ids])).logits[0].float(), -1)
        at = [i for i in range(len(enc.labels) - 1) if enc.labels[i + 1] != -100 and enc.input_ids[i + 1] != eot]
        np.testing.assert_allclose((rows[at] @ m).numpy(), phi.numpy(), atol=2e-3 * float(phi.abs().max()))


def test_the_fitted_gate_on_rows_decides_as_the_classifier_it_was_fitted_as(tiny_base, smollm2_tokenizer):
    vocab = ByteVocab.from_tokenizer(smollm2_tokenizer)
    eot = vocab.eot_ids[0]
    gate, report = fit_scope_gate(
        tiny_base,
        tiny_base.get_output_embeddings().weight,
        smollm2_tokenizer,
        eot,
        INSIDE,
        OUTSIDE,
        l2=1e-3,
        threshold=0.5,
        max_length=128,
    )
    assert gate.vocab_size == len(smollm2_tokenizer) and gate.threshold == 0.5
    assert report["examples_in_scope"] == 4 and report["examples_out_of_scope"] == 6
    # the two classes are told apart on the positions it was fitted on (32 hidden dimensions here)
    assert report["train_open_in_scope"] >= 0.75 and report["train_open_out_of_scope"] <= 0.25
    pair = PairModels(tiny_base, smollm2_tokenizer, vocab.eot_ids, b=tiny_base)

    def share_open(examples):
        opened = []
        for e in examples:
            head = pair.prompt_ids(e.prompt)
            ids = torch.tensor([head + text_ids(smollm2_tokenizer, e.target)])
            with torch.no_grad():
                rows = torch.log_softmax(tiny_base(input_ids=ids).logits[0].float(), -1)
            opened += gate.open(rows[len(head) - 1 : -1].numpy()).tolist()
        return sum(opened) / len(opened)

    assert abs(share_open(INSIDE) - report["train_open_in_scope"]) <= 0.02
    assert abs(share_open(OUTSIDE) - report["train_open_out_of_scope"]) <= 0.02


def test_fitting_needs_both_classes_and_a_valid_penalty(tiny_base, smollm2_tokenizer):
    eot = ByteVocab.from_tokenizer(smollm2_tokenizer).eot_ids[0]
    head = tiny_base.get_output_embeddings().weight
    with pytest.raises(ValueError, match="in scope and out of scope"):
        fit_scope_gate(tiny_base, head, smollm2_tokenizer, eot, INSIDE, [], l2=0.0, threshold=0.5, max_length=64)
    with pytest.raises(ValueError, match="l2 must be"):
        fit_scope_gate(tiny_base, head, smollm2_tokenizer, eot, INSIDE, OUTSIDE, l2=-1, threshold=0.5, max_length=64)


def _save(tmp_path, tiny_pair, tiny_base, vocab, gate, record):
    return save_artifact(
        tmp_path / "offset",
        tiny_pair.model,
        base_name="tiny",
        base_sha256=weights_sha256(tiny_base),
        vocab=vocab,
        alpha=1.0,
        objective="test",
        training={},
        data={},
        extra={"scope_gate": record} if record is not None else None,
        gate=gate,
    )


def test_the_gate_travels_in_the_artifact_under_its_checksum(tmp_path, tiny_pair, tiny_base, smollm2_tokenizer):
    vocab = ByteVocab.from_tokenizer(smollm2_tokenizer)
    rng = np.random.default_rng(0)
    gate = ScopeGate(rng.normal(size=len(smollm2_tokenizer)).astype(np.float32), -1.25, 0.3)
    with pytest.raises(ValueError, match="saved with its record"):
        _save(tmp_path, tiny_pair, tiny_base, vocab, gate, None)
    assert not (tmp_path / "offset").exists()  # nothing half-written
    path = _save(tmp_path, tiny_pair, tiny_base, vocab, gate, {"threshold": 0.3})
    art = load_artifact(path, tiny_base, vocab)
    loaded = art.scope_gate()
    assert loaded is not None and loaded.threshold == 0.3 and loaded.bias == pytest.approx(-1.25)
    np.testing.assert_array_equal(loaded.weight, gate.weight)
    assert GATE_FILE in art.manifest["files"]
    # an altered gate fails the artifact's checksums
    data = bytearray((path / GATE_FILE).read_bytes())
    data[-1] ^= 0xFF
    (path / GATE_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="scope_gate.safetensors fails its sha256"):
        load_artifact(path, tiny_base, vocab)


def test_an_artifact_without_a_gate_has_none(tmp_path, tiny_pair, tiny_base, smollm2_tokenizer):
    vocab = ByteVocab.from_tokenizer(smollm2_tokenizer)
    path = _save(tmp_path, tiny_pair, tiny_base, vocab, None, None)
    assert load_artifact(path, tiny_base, vocab).scope_gate() is None
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "scope_gate": {"threshold": 0.5}}))
    with pytest.raises(ArtifactError, match="bad scope gate"):
        load_artifact(path, tiny_base, vocab).scope_gate()


def test_a_closed_gate_zeroes_the_offset_in_every_score_the_pair_gives(tiny_pair, smollm2_tokenizer):
    width = len(smollm2_tokenizer)
    prompt = tiny_pair.prompt_ids([{"role": "user", "content": "Where is the Velmor Spire?"}])
    ids = text_ids(smollm2_tokenizer, " It stands in Qorvath.")
    u, b = tiny_pair.token_logprobs(prompt, ids)
    assert not np.allclose(u, b)  # the random offset moves every token
    tiny_pair.gate = open_gate(width)
    u_open, _ = tiny_pair.token_logprobs(prompt, ids)
    np.testing.assert_allclose(u_open, u)
    tiny_pair.gate = closed_gate(width)
    u_closed, b_closed = tiny_pair.token_logprobs(prompt, ids)
    np.testing.assert_array_equal(u_closed, b_closed)
    assert tiny_pair.sequence_offset(prompt, " It stands in Qorvath.", True)[0] == 0.0
    scores = tiny_pair.answer_scores(prompt, ids, 5)
    assert not scores.delta.any() and not scores.top_delta.any()
    # token mode: the aligner's Δ for every candidate, at the next position and in a draft
    aligner = tiny_pair.aligner(prompt, same_tokenizer=True)
    cands = [smollm2_tokenizer.decode([t]).encode() for t in ids[:4]]
    assert not aligner.deltas(cands).any()
    rows_u, rows_b = tiny_pair.aligner(prompt, same_tokenizer=True).next_rows()
    np.testing.assert_array_equal(rows_u, rows_b)
    tiny_pair.gate = open_gate(width)
    assert tiny_pair.aligner(prompt, same_tokenizer=True).deltas(cands).any()


def test_greedy_decoding_through_a_closed_gate_is_b(tiny_pair, smollm2_tokenizer):
    u = tiny_pair.model  # B with a random LoRA adapter
    eot = ByteVocab.from_tokenizer(smollm2_tokenizer).eot_ids
    prompts = [[{"role": "user", "content": e.prompt[0]["content"]}] for e in INSIDE + OUTSIDE]
    pair = PairModels(u.eval(), smollm2_tokenizer, eot)
    b_answers = [d.tokens for d in greedy_decode(pair, prompts, alpha=0.0, threshold=None, max_tokens=8)]
    offset = [d.tokens for d in greedy_decode(pair, prompts, alpha=50.0, threshold=None, max_tokens=8)]
    assert offset != b_answers
    width = len(smollm2_tokenizer)
    closed = pair.with_gate(closed_gate(width))
    assert [d.tokens for d in greedy_decode(closed, prompts, alpha=50.0, threshold=None, max_tokens=8)] == b_answers
    opened = pair.with_gate(open_gate(width))
    assert [d.tokens for d in greedy_decode(opened, prompts, alpha=50.0, threshold=None, max_tokens=8)] == offset
    assert pair.gate is None  # with_gate leaves the original as it was


@torch.no_grad()
def test_hidden_states_known_from_training_give_the_same_gate(tiny_base, smollm2_tokenizer):
    """B's hidden states that training's reference passes kept (by token ids) stand in for
    running B again: the same features, so the same gate; unknown sequences are run."""
    eot = ByteVocab.from_tokenizer(smollm2_tokenizer).eot_ids[0]
    head = tiny_base.get_output_embeddings().weight
    known = {}
    for e in [*INSIDE, *OUTSIDE[:3]]:  # some known, some not
        ids = encode(e, smollm2_tokenizer, eot, 128).input_ids
        known[tuple(ids)] = tiny_base(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    kwargs = dict(l2=1e-3, threshold=0.5, max_length=128)
    plain, _ = fit_scope_gate(tiny_base, head, smollm2_tokenizer, eot, INSIDE, OUTSIDE, **kwargs)
    reused, _ = fit_scope_gate(tiny_base, head, smollm2_tokenizer, eot, INSIDE, OUTSIDE, known=known, **kwargs)
    scale = float(np.abs(plain.weight).max())
    np.testing.assert_allclose(reused.weight, plain.weight, atol=1e-2 * scale)
    assert abs(reused.bias - plain.bias) <= 1e-2 * max(1.0, abs(plain.bias))
