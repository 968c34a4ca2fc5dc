"""Scoring given text (proxy.decoding.scoring) and the HTTP error shapes of context overflow,
without a server: hand-computed q, the on-disk cache, token bytes recovered from
vLLM's token strings, and each server's "context is full" body mapped to
ContextExhausted (fault injection: the openai SDK goes through ``httpx2``, which
respx does not patch, so the mock is its own ``MockTransport``, as in test_cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adapters.base import Candidate, Context, ContextExhausted, Position, RemoteRejected, ScoredText
from adapters.openai_chat import ChatAdapter
from adapters.profiles import VLLM
from adapters.retry import RetryPolicy
from adapters.utf8 import answer_token_bytes, strip_held_back
from adapters.wire import candidate_from_wire
from proxy.decoding.scoring import PromptLogprobsCache, q_token_logprobs, support


def _pos(own: tuple[str, float, int], *cands: tuple[str, float, int]) -> Position:
    mk = lambda t: Candidate(t[0].encode(), t[1], t[0], t[2])  # noqa: E731
    return Position(tuple(mk(c) for c in cands), mk(own))


def test_q_token_logprobs_by_hand():
    a, b, c = math.log(0.5), math.log(0.3), math.log(0.05)
    pos_in = _pos(("x", b, 2), ("y", a, 1), ("x", b, 2))  # own token in the top-k
    pos_out = _pos(("z", c, 3), ("y", a, 1), ("x", b, 2))  # own token outside it
    scored = ScoredText((2, 3), (pos_in, pos_out))
    deltas = [np.array([-1.0, 0.5]), np.array([-1.0, 0.5, -2.0])]
    got = q_token_logprobs(scored, deltas, alpha=2.0, threshold=None)
    # position 0: S = {y, x}, rest = 0.2; position 1: S ∪ {z} = {y, x, z}, rest = 0.15
    w0 = [0.5 * math.exp(-2.0), 0.3 * math.exp(1.0)]
    w1 = [0.5 * math.exp(-2.0), 0.3 * math.exp(1.0), 0.05 * math.exp(-4.0)]
    want = [math.log(w0[1] / (sum(w0) + 0.2)), math.log(w1[2] / (sum(w1) + 0.15))]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert [len(support(p)) for p in scored.positions] == [2, 3]
    # α = 0, no offset, or out of scope (s_t above −τ): the remote's own logprobs
    own = [b, c]
    np.testing.assert_allclose(q_token_logprobs(scored, deltas, alpha=0.0, threshold=None), own)
    np.testing.assert_allclose(q_token_logprobs(scored, None, alpha=2.0, threshold=None), own)
    np.testing.assert_allclose(q_token_logprobs(scored, deltas, alpha=2.0, threshold=5.0), own)
    # an own token the pair cannot represent has probability 0 under q
    bad = [np.array([-1.0, -np.inf]), deltas[1]]
    assert q_token_logprobs(scored, bad, alpha=2.0, threshold=None)[0] == -np.inf


def test_cache_round_trip_and_unreadable_entry(tmp_path):
    cache = PromptLogprobsCache(tmp_path)
    pos = Position(
        (
            Candidate(b"a", -0.1, "a", 7),
            Candidate(None, -math.inf, "\ufffd", 9),
            Candidate(b"", -3.0, "<eot>", 2, True),
        ),
        Candidate(b"a", -0.1, "a", 7),
    )
    scored = ScoredText((7,), (pos,))
    ctx = Context(messages=({"role": "user", "content": "q"},))
    key = cache.key("http://h/v1|m", ctx, "a", 3)
    assert key != cache.key("http://h/v1|m", ctx, "a", 4) != cache.key("http://other/v1|m", ctx, "a", 3)
    assert cache.get(key) is None
    cache.put(key, scored)
    assert cache.get(key) == scored
    assert not list(tmp_path.rglob(".tmp-*"))  # written through a temporary file, renamed
    next(tmp_path.rglob(f"{key}.json")).write_text("{not json")
    assert cache.get(key) is None  # unreadable: asked again, not a crash


@pytest.mark.parametrize(
    ("tokens", "want"),
    [
        (["Paris", " é", " x"], [b"Paris", " é".encode(), b" x"]),
        (["Paris", " \ufffd", " x"], [b"Paris", " é".encode(), b" x"]),  # one token holds the whole character
        (["Paris", " ", "\ufffd", "\ufffd", " x"], [b"Paris", b" ", None, None, b" x"]),  # split unknown
        (["Pari", "z", " é x"], [b"Pari", None, None]),  # a string that is not the text: no guessing
    ],
)
def test_answer_token_bytes(tokens, want):
    assert answer_token_bytes(tokens, "Paris é x".encode()) == want


VLLM_400 = {
    "error": {
        "message": "This model's maximum context length is 2048 tokens. However, your prompt contains at least "
        "2049 input tokens, which exceeds this limit even without any output tokens.",
        "type": "BadRequestError",
        "param": "input_tokens",
        "code": 400,
    }
}
OPENAI_400 = {"error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}}
LLAMA_SERVER_400 = {
    "error": {
        "code": 400,
        "message": "the request exceeds the available context size",
        "type": "exceed_context_size_error",
    }
}
LLAMA_CPP_PYTHON_400 = {
    "error": {"message": "Requested tokens (5000) exceed context window of 2048", "type": "invalid_request_error"}
}
OTHER_400 = {"error": {"message": "messages: field required", "type": "BadRequestError", "code": 400}}


@pytest.mark.parametrize(
    ("body", "full"),
    [(VLLM_400, True), (OPENAI_400, True), (LLAMA_SERVER_400, True), (LLAMA_CPP_PYTHON_400, True), (OTHER_400, False)],
)
async def test_context_overflow_bodies_become_context_exhausted(body, full):
    from test_cases import mock_client

    def handler(request):
        import httpx2

        assert request.url.path == "/v1/chat/completions"
        return httpx2.Response(400, json=body)

    adapter = ChatAdapter(
        http_client=mock_client(handler),
        profile=VLLM,
        name="m",
        base_url="http://upstream.test/v1",
        model="m",
        api_key=None,
        retry=RetryPolicy(attempts=1),
    )
    try:
        with pytest.raises(RemoteRejected) as err:
            await adapter.draft(Context(messages=({"role": "user", "content": "hi"},)), n_tokens=4, top_k=5)
    finally:
        await adapter.aclose()
    assert isinstance(err.value, ContextExhausted) is full
    assert err.value.status == 400


@pytest.mark.parametrize("same_tokenizer", [True, False])
def test_scored_deltas_in_chunks_equal_step_by_step(tiny_pair, same_tokenizer):
    """Δ of a long answer scored in chunks of 3 positions (committing between chunks)
    equals Δ committed step by step with Aligner.deltas, on both alignment paths."""
    from proxy.decoding.scoring import scored_deltas

    pair = tiny_pair
    vocab = pair.vocab
    answer = pair.tokenizer.encode(
        " The quick brown fox jumps over the lazy dog near the river bank.", add_special_tokens=False
    )
    alternatives = pair.tokenizer.encode(" a the of and to in", add_special_tokens=False)
    positions = []
    for t in answer:
        cands = [Candidate(vocab.token_bytes[c], -1.0 - i, str(c), c) for i, c in enumerate(alternatives) if c != t]
        positions.append(Position(tuple(cands), Candidate(vocab.token_bytes[t], -0.5, str(t), t)))
    scored = ScoredText(tuple(answer), tuple(positions))
    prompt = pair.prompt_ids([{"role": "user", "content": "Tell me something."}])
    chunked = scored_deltas(pair.aligner(prompt, same_tokenizer=same_tokenizer), scored, chunk=3)
    one = scored_deltas(pair.aligner(prompt, same_tokenizer=same_tokenizer), scored, chunk=1000)
    step = pair.aligner(prompt, same_tokenizer=same_tokenizer)
    want = []
    for pos in positions:
        want.append(step.deltas([c.data for c in support(pos)]))
        step.commit(pos.sampled.data)
    assert chunked is not None and one is not None and len(chunked) == len(answer) > 3
    for a, b, c in zip(chunked, one, want, strict=True):
        np.testing.assert_allclose(a, c, atol=1e-4)
        np.testing.assert_allclose(b, c, atol=1e-4)


def test_support_keeps_the_answers_bytes_and_ids_recover_the_rest():
    """The answer's own token replaces its top-k copy (which may lack bytes), and with the
    pair's vocabulary every candidate's bytes come from its id (partial characters too)."""
    from proxy.decoding.scoring import own_index, with_token_bytes

    own = Candidate(" é".encode(), -0.2, " \ufffd", 5)
    pos = Position((Candidate(None, -0.2, " \ufffd", 5), Candidate(None, -1.0, "\ufffd", 6)), own)
    cands = support(pos)
    assert len(cands) == 2 and cands[own_index(pos, cands)].data == " é".encode()
    token_bytes = [b""] * 5 + [" é".encode(), b"\xc3", b"<eot>"]
    fixed = with_token_bytes(ScoredText((5,), (pos,)), token_bytes, eot_ids=[7]).positions[0]
    assert [c.data for c in fixed.candidates] == [" é".encode(), b"\xc3"]
    eot = with_token_bytes(ScoredText((7,), (Position((), Candidate(b"x", -1.0, "e", 7)),)), token_bytes, [7])
    assert eot.positions[0].sampled.is_eot


def _vllm_mock(entry):
    """A fake vLLM: ``/tokenize`` gives the prompt's ids [1, 2]; the chat call gives the
    whole text's ids [1, 2, 3] and ``entry`` as the answer token's prompt_logprobs."""
    import json

    import httpx2

    def handler(request):
        if request.url.path == "/tokenize":
            return httpx2.Response(200, json={"count": 2, "tokens": [1, 2]})
        body = json.loads(request.content)
        assert body["prompt_logprobs"] == 2 and body["continue_final_message"] is True
        return httpx2.Response(
            200,
            json={
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "length"}],
                "prompt_token_ids": [1, 2, 3],
                "prompt_logprobs": [None, {"2": {"logprob": -0.1, "rank": 1, "decoded_token": "b"}}, entry],
            },
        )

    return handler


async def test_score_text_parses_vllm_prompt_logprobs_and_refuses_malformed_ones():
    from test_cases import mock_client

    from adapters.base import RemoteBadResponse

    good = {
        "3": {"logprob": -2.5, "rank": 3, "decoded_token": " hi"},
        "7": {"logprob": -0.5, "rank": 1, "decoded_token": " yo"},
        "8": {"logprob": -1.5, "rank": 2, "decoded_token": " ok"},
    }
    ctx = Context(messages=({"role": "user", "content": "q"},))
    for entry, ok in ((good, True), ({"3": "garbage"}, False), ({"4": {"logprob": -1.0}}, False)):
        adapter = ChatAdapter(
            profile=VLLM,
            name="m",
            base_url="http://upstream.test/v1",
            model="m",
            api_key=None,
            http_client=mock_client(_vllm_mock(entry)),
            retry=RetryPolicy(attempts=1),
        )
        try:
            if ok:
                scored = await adapter.score_text(ctx, " hi", top_k=2)
                assert scored.token_ids == (3,) and scored.prompt_ids == (1, 2)
                pos = scored.positions[0]
                assert [(c.token_id, c.data) for c in pos.candidates] == [(7, b" yo"), (8, b" ok")]  # rank <= k
                assert (pos.sampled.token_id, pos.sampled.data, pos.sampled.logprob) == (3, b" hi", -2.5)
            else:
                with pytest.raises(RemoteBadResponse):
                    await adapter.score_text(ctx, " hi", top_k=2)
        finally:
            await adapter.aclose()


def test_partial_character_tokens_from_vllm_chat_logprobs():
    """vLLM's chat logprobs print a token holding part of a character as "" with empty bytes
    (unknowable: left out of S_t, where it used to enter with no bytes), and the token that
    completes it with the whole character's bytes (the accepted part is removed again)."""
    assert candidate_from_wire("", -1.0, [], eot_tokens=frozenset()).data is None
    assert candidate_from_wire("a", -1.0, [97], eot_tokens=frozenset()).data == b"a"
    star = "🌌".encode()
    pos = Position((Candidate(star, -1.0, "🌌"), Candidate(b" x", -2.0, " x")), Candidate(star, -1.0, "🌌"))
    after = Position((Candidate(b"!", -1.0, "!"),), Candidate(b"!", -1.0, "!"))
    fixed = strip_held_back([pos, after], b"hi " + star[:3])
    assert [c.data for c in fixed[0].candidates] == [star[3:], b" x"] and fixed[0].sampled.data == star[3:]
    assert fixed[1] == after
    assert strip_held_back([pos], b"hi ") == (pos,)  # on a character boundary nothing changes
