"""Alignment across tokenizers on a tiny random pair (SmolLM2's real tokenizer).

The reference is a plain full forward pass per candidate and model, with the
definition of docs/concepts.md written out again: canonical path + cover of the last piece.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from adapters.hf_vocab import _piece_bytes
from adapters.utf8 import REPLACEMENT_BYTES
from adapters.wire import candidate_from_wire
from proxy.decoding.alignment import EOT
from proxy.decoding.offset import log_softmax
from proxy.decoding.vocab import ByteVocab

PROMPT = [{"role": "user", "content": "Tell me about Paris."}]


def log_p(pair, trunk: list[int], s: bytes | None, adapter: bool, eot_after: bytes = b"") -> float:
    """log P_m(s | trunk) by brute force: one full forward of trunk + path.
    ``s=None``: the tokens of ``eot_after``, then end of turn."""
    vocab = pair.vocab
    if s is None:
        path, final = vocab.encode(eot_after), vocab.eot_ids[0]
    else:
        ids = vocab.encode(s)
        path, final = ids[:-1], vocab.token_bytes[ids[-1]]
    ctx = contextlib.nullcontext() if adapter else pair.model.disable_adapter()
    with ctx, torch.no_grad():
        lp = torch.log_softmax(pair.model(torch.tensor([trunk + path])).logits[0].double(), -1)
    total = sum(lp[len(trunk) - 1 + j, t].item() for j, t in enumerate(path))
    row = lp[-1]
    if isinstance(final, int):
        return total + row[final].item()
    lo, hi = vocab.cover_range(final)
    return total + torch.logsumexp(row[torch.from_numpy(vocab.sorted_ids[lo:hi])], 0).item()


def naive_delta(pair, trunk, tail: bytes, c: bytes | None) -> float:
    s = None if c is None else tail + c
    d = log_p(pair, trunk, s, True, tail) - log_p(pair, trunk, s, False, tail)
    if tail:
        d -= log_p(pair, trunk, tail, True) - log_p(pair, trunk, tail, False)
    return d


HARD = [
    b" Paris",  # an ordinary token
    b" P",  # a prefix of other candidates / tokens
    b" Par",
    b" the capital of France",  # longer than any local token
    "é".encode(),  # a multi-byte character
    "é".encode()[:1],  # half of it
    "日本".encode(),
    EOT,
]


def test_tree_pass_equals_brute_force(tiny_pair):
    prompt = tiny_pair.prompt_ids(PROMPT)
    al = tiny_pair.aligner(prompt, same_tokenizer=False)
    got = al.deltas(HARD)
    want = [naive_delta(tiny_pair, prompt, b"", c) for c in HARD]
    assert np.allclose(got, want, atol=2e-5), (got, want)
    assert np.all(np.isfinite(got))


def test_tail_carried_across_steps_and_split_character(tiny_pair):
    prompt = tiny_pair.prompt_ids(PROMPT)
    al = tiny_pair.aligner(prompt, same_tokenizer=False)
    al.deltas([b"Caf"])
    for piece in (b"Caf", "é".encode()[:1]):  # the remote split "é" across two tokens
        al.commit(piece)
    assert al.tail.endswith(b"\xc3")
    cands = ["é".encode()[1:], "é".encode()[1:] + b" au lait", b"\xa9s", EOT]
    got = al.deltas(cands)
    trunk = al.scorer.trunk_ids
    want = [naive_delta(tiny_pair, trunk, al.tail, c) for c in cands]
    assert np.allclose(got, want, atol=2e-5), (got, want)
    # One more step: the committed character completes; the text is whole again.
    al.commit("é".encode()[1:])
    al.commit(b" au")
    got2 = al.deltas([b" lait", b" chocolat"])
    want2 = [naive_delta(tiny_pair, al.scorer.trunk_ids, al.tail, c) for c in (b" lait", b" chocolat")]
    assert np.allclose(got2, want2, atol=2e-5)


def test_fast_path_equals_general_path(tiny_pair, tiny_base, smollm2_tokenizer):
    from conftest import make_tiny_pair

    other = make_tiny_pair(tiny_base, smollm2_tokenizer)  # same weights, separate caches
    prompt = tiny_pair.prompt_ids(PROMPT)
    fast = tiny_pair.aligner(prompt, same_tokenizer=True)
    general = other.aligner(prompt, same_tokenizer=False)
    rng = np.random.default_rng(0)
    words = [b"Paris", b" is", b" the", b" capital", b" of", b" France", b"."]
    cands = [b" city", b" big", b" a", b" the", b" not", b" France", b" Paris", EOT]
    for w in words:
        ell = rng.normal(size=len(cands))
        q_fast = log_softmax(ell + fast.deltas(cands))
        q_general = log_softmax(ell + general.deltas(cands))
        assert np.allclose(np.exp(q_fast), np.exp(q_general), atol=1e-5)
        fast.commit(w)
        general.commit(w)
    assert fast.tail == b"" and general.tail != b""  # the two paths really differed


def test_zero_adapter_gives_zero_offset(tiny_base, smollm2_tokenizer):
    from conftest import make_tiny_pair

    pair = make_tiny_pair(tiny_base, smollm2_tokenizer, zero=True)
    al = pair.aligner(pair.prompt_ids(PROMPT), same_tokenizer=False)
    assert np.allclose(al.deltas(HARD), 0.0, atol=1e-6)


def test_leading_space_conventions_map_to_the_same_bytes():
    assert _piece_bytes("\u2581Paris", byte_level=False) == b" Paris"  # SentencePiece (Gemma)
    assert _piece_bytes("ĠParis", byte_level=True) == b" Paris"  # byte-level BPE (SmolLM2)
    assert _piece_bytes("<0xC3>", byte_level=False) == b"\xc3"


def test_vocab_cover_and_encode(smollm2_tokenizer):
    vocab = ByteVocab.from_tokenizer(smollm2_tokenizer)
    lo, hi = vocab.cover_range(b" Par")
    covered = {vocab.token_bytes[i] for i in vocab.sorted_ids[lo:hi]}
    assert b" Paris" in covered and b" Par" in covered and all(b.startswith(b" Par") for b in covered)
    assert vocab.bytes_of(vocab.encode("héllo wörld".encode())) == "héllo wörld".encode()
    assert vocab.bytes_of(vocab.encode("日".encode()[:2])) == "日".encode()[:2]
    assert vocab.bytes_of(vocab.encode(b"ab\xc3cd \xe2\x82")) == b"ab\xc3cd \xe2\x82"  # invalid bytes in the middle
    with pytest.raises(ValueError, match="0xff has no token"):  # SmolLM2 has no token for 0xff
        vocab.encode(b"a\xff")
    assert vocab.token_bytes[vocab.eot_ids[0]] is None  # special tokens never match text


def test_unrepresentable_candidate_gets_zero_probability(tiny_pair):
    al = tiny_pair.aligner(tiny_pair.prompt_ids(PROMPT), same_tokenizer=False)
    got = al.deltas([b" Paris", b"\xff", b" Rome"])
    assert np.isfinite(got[[0, 2]]).all() and got[1] == -np.inf


def test_replacement_char_bytes_are_unknown_not_text():
    c = candidate_from_wire("\ufffd", -0.5, list(REPLACEMENT_BYTES), eot_tokens=frozenset())
    assert c.data is None and not c.usable
    c = candidate_from_wire("", -0.5, None, eot_tokens=frozenset())  # llama-cpp-python's empty string
    assert c.data is None
    c = candidate_from_wire("é", -0.5, [195, 169], eot_tokens=frozenset())
    assert c.data == "é".encode() and c.usable


@pytest.mark.parametrize("bad", [float("-inf"), float("nan"), -9999.0])
def test_non_finite_wire_logprobs_are_unusable(bad):
    assert not candidate_from_wire("a", bad, None, eot_tokens=frozenset()).usable


@pytest.mark.parametrize("same_tokenizer", [True, False])
def test_draft_in_one_pass_equals_step_by_step(tiny_base, smollm2_tokenizer, same_tokenizer):
    """A whole draft scored in one tree pass gives each position the Δ that step-by-step
    scoring gives after committing the draft's earlier pieces; after a rejection the
    caches keep the accepted part of the draft's chain and drop the rest."""
    from conftest import make_tiny_pair

    drafted, stepwise = make_tiny_pair(tiny_base, smollm2_tokenizer), make_tiny_pair(tiny_base, smollm2_tokenizer)
    prompt = drafted.prompt_ids(PROMPT)
    spec = drafted.aligner(prompt, same_tokenizer=same_tokenizer)
    step = stepwise.aligner(prompt, same_tokenizer=same_tokenizer)
    chain = [b"Paris", b" is", b" the", b" cap", "é".encode()[:1], "é".encode()[1:], b"ital"]
    cands = [[b" city", b" is", b" the", b" Par", "é".encode()[1:], EOT] for _ in range(len(chain) + 1)]
    got = spec.draft_deltas(chain, cands)
    assert len(got) == len(chain) + 1
    for j, c in enumerate(cands):
        want = step.deltas(c)
        assert np.allclose(got[j], want, atol=2e-5, equal_nan=True), (j, got[j], want)
        if j < len(chain):
            step.commit(chain[j])
    # Accept three pieces, then a different one: the next step matches a fresh step-by-step run.
    fresh = make_tiny_pair(tiny_base, smollm2_tokenizer).aligner(prompt, same_tokenizer=same_tokenizer)
    for piece in [*chain[:3], b" largest"]:
        spec.commit(piece)
        fresh.commit(piece)
    after = [b" city", b" town", EOT]
    assert np.allclose(spec.deltas(after), fresh.deltas(after), atol=2e-5)
    assert spec.scorer.trunk_ids == fresh.scorer.trunk_ids
    # A draft accepted whole keeps its chain in the caches: nothing runs twice.
    got = spec.draft_deltas([b" in", b" France"], [after, after, after])
    for piece in (b" in", b" France"):
        spec.commit(piece)
        fresh.commit(piece)
    spec._settle()
    assert spec.pending == []  # the accepted chain is already in the caches
    assert np.allclose(spec.deltas(after), fresh.deltas(after), atol=2e-5)
    assert spec.scorer.trunk_ids == fresh.scorer.trunk_ids


@pytest.mark.parametrize("same_tokenizer", [True, False])
def test_next_rows_are_the_pairs_next_token_rows_and_change_no_delta(
    tiny_pair, tiny_base, smollm2_tokenizer, same_tokenizer
):
    """``next_rows`` gives log P_U and log P_B of the next local token after the committed
    text (brute force: one full forward), ``None`` inside a local token; the Δs that
    follow are the ones an aligner that never asked gives."""
    from conftest import make_tiny_pair

    prompt = tiny_pair.prompt_ids(PROMPT)
    asked = tiny_pair.aligner(prompt, same_tokenizer=same_tokenizer)
    plain = make_tiny_pair(tiny_base, smollm2_tokenizer).aligner(prompt, same_tokenizer=same_tokenizer)
    cands = [b" Paris", b" the", b" P", EOT]
    checked = 0
    for word in (b"Paris", b" is", b" the"):
        rows = asked.next_rows()
        if rows is None:  # the general path keeps the last local token in the tail: no row yet
            assert not same_tokenizer and asked.tail
            asked.commit(word)
            plain.commit(word)
            continue
        trunk = asked.scorer.trunk_ids
        for m, adapter in enumerate((True, False)):
            ctx = contextlib.nullcontext() if adapter else tiny_pair.model.disable_adapter()
            with ctx, torch.no_grad():
                want = torch.log_softmax(tiny_pair.model(torch.tensor([trunk])).logits[0, -1].double(), -1)
            assert np.allclose(rows[m], want.numpy(), atol=2e-5)
        assert not np.allclose(rows[0], rows[1])  # the tiny pair has an offset
        assert np.allclose(asked.deltas(cands), plain.deltas(cands), atol=1e-6)
        checked += 1
        asked.commit(word)
        plain.commit(word)
    assert checked == (3 if same_tokenizer else 1)  # the general path: at the prompt's end
