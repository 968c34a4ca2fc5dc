"""Dynamic batching of the pair's tree passes across concurrent requests
(proxy.pair.batcher.TreeBatcher): the same rows and the same caches as passes run one by
one, on a tiny random pair with SmolLM2's tokenizer."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import make_tiny_pair
from fakes import FakeRemote, script

from adapters.base import Context
from proxy.config import ServerConfig
from proxy.decoding.alignment import Tree
from proxy.decoding.served import ServedModel
from proxy.decoding.types import SamplingParams
from proxy.pair import forward
from proxy.pair.batcher import BatchSettings, TreeJob
from proxy.pair.few_rows import MAX_ROWS, MIN_WEIGHTS, use_few_rows_kernel
from proxy.pair.scorer import PairScorer
from proxy.pair.sides import Side

PROMPTS = ("Hi.", "Tell me about Paris and its museums.", "What is the capital of France, in one word?")
# A chain, a forest of two branches after the trunk, one token: the shapes the aligner sends.
TREES = (
    (Tree((330, 4518, 314, 253), (-1, 0, 1, 2)), 4),
    (Tree((330, 4518, 314, 1953, 28), (-1, 0, 1, -1, 3)), 2),
    (Tree((30,), (-1,)), 1),
)
NEXT = Tree((42,), (-1,))
"""Scored after each tree's commit: its rows read the caches that the batched pass left."""

WAIT = BatchSettings(max_batch=8, window_s=10.0)
"""A window long enough that every request in flight is always queued before a pass."""


def steps(pair, prompt: str, tree: Tree, commit: int, start=None) -> list[tuple[np.ndarray, np.ndarray]]:
    ids = pair.prompt_ids(prompt=prompt)
    if start is not None:
        start.wait()  # every request is in flight before the first pass
    scorer = PairScorer(pair)
    chain = Tree(tuple(ids), tuple(range(-1, len(ids) - 1)))
    out = [scorer.score(chain, len(ids)), scorer.score(tree, commit), scorer.score(NEXT, 1)]
    return [(u.copy(), b.copy()) for u, b in out]


def unfused(pair):
    """``pair`` running one pass per model (the reference for U and B as rows of one pass)."""
    pair.fuse_sides = False
    return pair


@pytest.mark.parametrize("fuse", [True, False], ids=["U-and-B-in-one-pass", "a-pass-per-model"])
def test_batched_passes_give_the_rows_and_caches_of_one_by_one(tiny_base, smollm2_tokenizer, fuse):
    solo = unfused(make_tiny_pair(tiny_base, smollm2_tokenizer, batching=BatchSettings(max_batch=1)))
    shared = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=WAIT)
    shared.fuse_sides = fuse
    assert forward.fused(shared) is fuse
    want = [steps(solo, p, t, c) for p, (t, c) in zip(PROMPTS, TREES, strict=True)]
    start = threading.Barrier(len(PROMPTS))
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(
            pool.map(lambda a: shared.tracked(steps, shared, a[0], *a[1], start), zip(PROMPTS, TREES, strict=True))
        )
    # Three passes (prompt, tree, next token) of three requests each: batched, with different
    # cache lengths (the prompts) and tree shapes padded to the widest.
    assert (shared.batcher.jobs, shared.batcher.passes) == (9, 3)
    for w, g in zip(want, got, strict=True):
        for (wu, wb), (gu, gb) in zip(w, g, strict=True):
            np.testing.assert_allclose(gu, wu, atol=1e-4)
            np.testing.assert_allclose(gb, wb, atol=1e-4)
            assert not np.allclose(gu, gb)  # U and B really differ (the adapter was on for U only)


def test_reduce_reads_the_rows_inside_the_batched_pass(tiny_base, smollm2_tokenizer):
    """``score(..., reduce=f)`` gives ``f`` of the rows that ``score`` gives, for batched
    passes too, and the batch hands back only ``f``'s values: no row outlives the pass."""
    solo = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=BatchSettings(max_batch=1))
    shared = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=WAIT)

    def f(rows: np.ndarray) -> np.ndarray:
        return rows[:, [7, 330]].astype(np.float64).sum(axis=1) + rows.max(axis=1)

    def reduced(pair, prompt: str, tree: Tree, commit: int, start=None) -> list[tuple[np.ndarray, np.ndarray]]:
        ids = pair.prompt_ids(prompt=prompt)
        if start is not None:
            start.wait()
        scorer = PairScorer(pair)
        chain = Tree(tuple(ids), tuple(range(-1, len(ids) - 1)))
        return [scorer.score(chain, len(ids), reduce=f), scorer.score(tree, commit, [0, 1], reduce=f)]

    want = [[(f(u), f(b)) for u, b in steps(solo, p, t, c)[:2]] for p, (t, c) in zip(PROMPTS, TREES, strict=True)]
    for w in want:  # the tree's rows 0 (the trunk's last, kept from the prompt's pass) and 1
        w[1] = (w[1][0][[0, 1]], w[1][1][[0, 1]])
    start = threading.Barrier(len(PROMPTS))
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(
            pool.map(lambda a: shared.tracked(reduced, shared, a[0], *a[1], start), zip(PROMPTS, TREES, strict=True))
        )
    assert shared.batcher.passes == 2 and shared.batcher.jobs == 6
    for w, g in zip(want, got, strict=True):
        for (wu, wb), (gu, gb) in zip(w, g, strict=True):
            assert gu.shape == wu.shape and gu.dtype == np.float64
            np.testing.assert_allclose(gu, wu, atol=1e-4)
            np.testing.assert_allclose(gb, wb, atol=1e-4)


def test_a_failing_job_fails_alone(tiny_base, smollm2_tokenizer):
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=WAIT)
    ids = pair.prompt_ids(prompt="Hello there.")
    n = len(ids)

    def job(allowed_cols: int) -> TreeJob:
        from transformers import DynamicCache

        return TreeJob(
            list(ids),
            torch.tril(torch.ones((n, allowed_cols), dtype=torch.bool), diagonal=allowed_cols - n),
            torch.arange(n),
            [n - 1],
            {Side.U: DynamicCache(), Side.B: DynamicCache()},
        )

    good, bad = job(n), job(n + 3)  # the bad one's mask claims 3 cached positions that are not there

    start = threading.Barrier(2)

    def run(j: TreeJob):
        try:
            return pair.tracked(lambda: start.wait() >= 0 and pair.batcher.run(j))
        except ValueError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        rows, error = pool.map(run, (good, bad))
    assert isinstance(error, ValueError) and "does not fit" in str(error)
    assert rows[Side.U].shape == rows[Side.B].shape == (1, len(pair.vocab))
    assert good.caches[Side.U].get_seq_length() == n
    assert pair.batcher.passes == 1  # the two were batched, then the good one ran again alone


def test_concurrent_answers_equal_sequential_ones(tiny_base, smollm2_tokenizer):
    """Greedy answers of six concurrent requests through the decoder (the tiny pair's
    offset changes tokens, so a wrong row would change the text)."""
    words = [" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]

    def model(batching: BatchSettings) -> ServedModel:
        pair = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=batching)
        return ServedModel("m", FakeRemote(script(words, alternatives=4)), pair=pair, alpha=1.0, max_draft_tokens=4)

    async def answer(m: ServedModel, prompt: str) -> str:
        params = SamplingParams(max_tokens=12, temperature=0.0)
        return "".join([p.text async for p in m.generate(Context(prompt=prompt), params)])

    prompts = [f"Story number {i}: {'once ' * i}upon a time" for i in range(6)]
    solo = model(BatchSettings(max_batch=1))

    async def sequential() -> list[str]:
        return [await answer(solo, p) for p in prompts]

    shared = model(BatchSettings(max_batch=8, window_s=0.05))

    async def concurrent() -> list[str]:
        return list(await asyncio.gather(*(answer(shared, p) for p in prompts)))

    want, got = asyncio.run(sequential()), asyncio.run(concurrent())
    assert got == want
    assert len(set(want)) > 1 and any("alt" in w for w in want)  # the offset changed tokens
    assert shared.pair.batcher.passes < shared.pair.batcher.jobs  # passes were shared


def test_server_keys_make_batch_settings():
    cfg = ServerConfig(pair_max_batch=4, pair_batch_window_ms=2.5, pair_max_batch_tokens=64)
    assert cfg.pair_batching() == BatchSettings(max_batch=4, window_s=0.0025, max_tokens=64)
    with pytest.raises(ValueError, match="pair_max_batch"):
        ServerConfig(pair_max_batch=0)


@pytest.mark.parametrize("fuse", [True, False], ids=["U-and-B-in-one-pass", "a-pass-per-model"])
def test_a_pass_failing_half_way_leaves_no_tokens_behind(tiny_base, smollm2_tokenizer, monkeypatch, fuse):
    """A batched pass with B's rows fails (one pass per model: after U's succeeded): the
    jobs run again alone from their old caches."""
    solo = unfused(make_tiny_pair(tiny_base, smollm2_tokenizer, batching=BatchSettings(max_batch=1)))
    shared = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=WAIT)
    shared.fuse_sides = fuse
    real = forward.forward_rows

    def flaky(pair, rows):
        if pair is shared and len({id(job) for job, _ in rows}) > 1 and any(side is Side.B for _, side in rows):
            raise RuntimeError("injected")
        return real(pair, rows)

    monkeypatch.setattr(forward, "forward_rows", flaky)
    want = [steps(solo, p, t, c) for p, (t, c) in zip(PROMPTS[:2], TREES[:2], strict=True)]
    start = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        got = list(
            pool.map(
                lambda a: shared.tracked(steps, shared, a[0], *a[1], start), zip(PROMPTS[:2], TREES[:2], strict=True)
            )
        )
    assert shared.batcher.passes == shared.batcher.jobs == 6  # every batch fell back to single passes
    for w, g in zip(want, got, strict=True):
        for (wu, wb), (gu, gb) in zip(w, g, strict=True):
            np.testing.assert_allclose(gu, wu, atol=1e-4)
            np.testing.assert_allclose(gb, wb, atol=1e-4)


# ----------------------------------------------------------------- prefix cache
SYSTEM = [{"role": "system", "content": "You answer questions about European capitals, briefly and politely."}]


def chat_ids(pair, question: str) -> list[int]:
    return pair.prompt_ids([*SYSTEM, {"role": "user", "content": question}])


def first_steps(pair, ids: list[int], keep: int | None = None):
    """The prompt as the aligner sends it (a chain, its last row read), a two-token draft
    after it, optionally rolled back to ``keep`` of the draft's commit, then one token."""
    scorer = PairScorer(pair)
    chain = Tree(tuple(ids), tuple(range(-1, len(ids) - 1)))
    out = [scorer.score(chain, len(ids), [len(ids)])]
    out.append(scorer.score(Tree((330, 4518), (-1, 0)), 2))
    if keep is not None:
        scorer.rollback(keep)
    out.append(scorer.score(Tree((42,), (-1,)), 1))
    return [(u.copy(), b.copy()) for u, b in out], scorer


def test_prefix_cache_runs_only_the_new_tokens_with_the_same_rows(tiny_base, smollm2_tokenizer):
    plain = make_tiny_pair(tiny_base, smollm2_tokenizer, prefix_cache_tokens=0)
    cached = make_tiny_pair(tiny_base, smollm2_tokenizer)
    first, second = chat_ids(cached, "What is the capital of France?"), chat_ids(cached, "And of Italy, please?")
    common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert common >= 8
    first_steps(cached, first)
    assert cached.prefix_cache is not None and cached.prefix_cache.hits == 0
    seen = []
    real = cached.forward_trees
    cached.forward_trees = lambda jobs: seen.append(len(jobs[0].ids)) or real(jobs)  # type: ignore[method-assign]
    for keep in (None, 1, 0):  # rolled back into the draft, and to the prompt's end
        want, _ = first_steps(plain, second, keep)
        got, scorer = first_steps(cached, second, keep)
        # The system prompt's head did not run again; from the second time on the whole
        # prompt is cached but its last token, which runs to give the row after it.
        assert seen[0] == (len(second) - common if keep is None else 1)
        seen.clear()
        for (wu, wb), (gu, gb) in zip(want, got, strict=True):
            np.testing.assert_allclose(gu, wu, atol=1e-4)
            np.testing.assert_allclose(gb, wb, atol=1e-4)
        assert scorer.trunk_ids[: len(second)] == second
    assert cached.prefix_cache.tokens_reused >= 3 * common


def test_prefix_cache_is_not_used_where_a_row_inside_the_head_is_read(tiny_base, smollm2_tokenizer):
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    ids = chat_ids(pair, "What is the capital of France?")
    first_steps(pair, ids)
    scorer = PairScorer(pair)
    chain = Tree(tuple(ids), tuple(range(-1, len(ids) - 1)))
    u, _ = scorer.score(chain, len(ids))  # every row: rows inside the head are read
    assert pair.prefix_cache is not None and pair.prefix_cache.hits == 0
    assert u.shape[0] == len(ids) + 1


def test_prefix_cache_keeps_its_token_budget():
    from proxy.pair.prefix_cache import PrefixCache

    cache = PrefixCache(max_tokens=30)
    kv = {Side.B: [(torch.zeros(1, 2, 40, 4), torch.zeros(1, 2, 40, 4))]}

    class Layer:
        def __init__(self, k, v):
            self.keys, self.values = k, v

    class Cache:
        layers = [Layer(*kv[Side.B][0])]

        def get_seq_length(self):
            return 40

    cache.store(list(range(12)), {Side.B: Cache()}, (Side.B,))
    cache.store(list(range(100, 112)), {Side.B: Cache()}, (Side.B,))
    cache.store(list(range(12)) + [7, 7], {Side.B: Cache()}, (Side.B,))  # extends the first: replaces it
    assert cache.lookup(list(range(12)) + [7, 7, 9], 20)[0] == 14
    cache.store(list(range(200, 212)), {Side.B: Cache()}, (Side.B,))  # 14 + 12 + 12 > 30: the oldest goes
    assert cache.lookup(list(range(100, 112)), 20)[0] == 0
    head, found = cache.lookup(list(range(200, 212)) + [1], 20)
    assert head == 12 and found[Side.B][0][0].shape == (1, 2, 12, 4)
    assert cache.lookup(list(range(200, 212)), 7)[0] == 0  # under MIN_TOKENS usable: not worth a lookup


async def test_metrics_show_the_pairs_batches_and_prefix_cache(aiohttp_client, tiny_base, smollm2_tokenizer):
    from proxy.server.app import create_app

    words = [" The", " quick", " brown", " fox"]
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=BatchSettings(max_batch=8, window_s=0.05))
    models = {
        name: ServedModel(name, FakeRemote(script(words)), pair=pair, alpha=1.0, max_draft_tokens=4)
        for name in ("m", "same-pair")  # two models, one pair: one series
    }
    client = await aiohttp_client(create_app(models, batches=False))
    system = {"role": "system", "content": "You are a careful assistant who answers in one short sentence."}
    bodies = [
        {"model": "m", "messages": [system, {"role": "user", "content": f"Question {i}?"}], "max_tokens": 4}
        for i in range(4)
    ]

    async def pair_series() -> tuple[str, dict[str, float]]:
        text = await (await client.get("/metrics")).text()
        return text, {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("deltaproxy_pair_") and 'offset="test",pair="tiny"' in line
        }

    assert (await client.post("/v1/chat/completions", json=bodies[0])).status == 200  # its prompt is cached
    for r in await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies[1:])):
        assert r.status == 200
    text, series = await pair_series()
    assert len([line for line in text.splitlines() if line.startswith("deltaproxy_pair_passes_total")]) == 1
    assert series["deltaproxy_pair_tree_jobs_total"] > series["deltaproxy_pair_passes_total"] > 0  # batched
    # The prefix cache, one request at a time (how many of the concurrent three hit depends
    # on when each one's first pass is formed): each later request that begins like an
    # earlier one reuses its prompt's keys and values.
    before = series["deltaproxy_pair_prefix_cache_hits_total"], series["deltaproxy_pair_prefix_cache_tokens_total"]
    for i in (4, 5):
        body = {"model": "m", "messages": [system, {"role": "user", "content": f"Question {i}?"}], "max_tokens": 4}
        assert (await client.post("/v1/chat/completions", json=body)).status == 200
    _, series = await pair_series()
    assert series["deltaproxy_pair_prefix_cache_hits_total"] == before[0] + 2
    assert series["deltaproxy_pair_prefix_cache_tokens_total"] >= before[1] + 2 * 8


def test_a_closed_pair_stops_its_threads_and_can_be_freed(tiny_base, smollm2_tokenizer):
    import gc
    import weakref

    pair = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=WAIT)
    pair.tracked(steps, pair, PROMPTS[0], *TREES[0])  # starts the batcher's thread
    thread = pair.batcher._thread
    assert thread is not None and thread.is_alive()
    pair.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        steps(pair, PROMPTS[1], *TREES[1])
    # Nothing of the pair's own keeps it (and its weights) alive once its users let go.
    ref = weakref.ref(pair)
    del pair
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("max_batch", [1, 8])
def test_an_idle_pair_gives_freed_memory_back_once(tiny_base, smollm2_tokenizer, monkeypatch, max_batch):
    import time

    from proxy.pair.batcher import TreeBatcher

    monkeypatch.setattr(TreeBatcher, "IDLE_RELEASE_S", 0.2)
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=BatchSettings(max_batch=max_batch))
    try:
        pair.tracked(steps, pair, PROMPTS[0], *TREES[0])
        assert pair.batcher.releases == 0  # not while the pair works, nor right after
        time.sleep(0.6)
        assert pair.batcher.releases == 1  # once idle for IDLE_RELEASE_S, and not again while idle
        pair.tracked(steps, pair, PROMPTS[1], *TREES[1])
        time.sleep(0.6)
        assert pair.batcher.releases == 2
    finally:
        pair.close()


@pytest.mark.parametrize("streams", [1, 2])
def test_a_pass_waits_briefly_for_answers_between_passes(tiny_base, smollm2_tokenizer, monkeypatch, streams):
    """With two answers decoding, a pass waits (up to a fraction of the last pass's time) for
    the one that is between passes, as a token-by-token answer is while the remote answers:
    one pass for both. With one answer decoding, nothing waits: two passes."""
    import time

    from proxy.pair.batcher import TreeBatcher

    monkeypatch.setattr(TreeBatcher, "FOLLOW_MAX_S", 5.0)
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=BatchSettings(max_batch=8, window_s=0.0))
    batcher = pair.batcher
    batcher._last_pass_s = 4.0  # a follow window of 1 s (FOLLOW_FRACTION 0.25)
    for _ in range(streams):
        batcher.open_stream()

    def one(prompt: str, delay: float) -> float:
        time.sleep(delay)
        ids = pair.prompt_ids(prompt=prompt)
        pair.tracked(PairScorer(pair).score, Tree(tuple(ids), tuple(range(-1, len(ids) - 1))), len(ids))
        return time.monotonic()

    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(one, PROMPTS[:2], (0.0, 0.3))
        assert (batcher.passes, batcher.jobs) == ((1, 2) if streams == 2 else (2, 2))
        if streams == 1:
            assert first - t0 < 0.3  # the first answer's pass did not wait for the second
    finally:
        for _ in range(streams):
            batcher.close_stream()
        pair.close()


def test_u_and_b_in_one_pass_give_the_rows_of_a_pass_per_model_and_leave_no_hooks(tiny_base, smollm2_tokenizer):
    """One request token by token (the pass the pair runs for every token of an in-scope
    answer): U's and B's rows from one pass equal those of two passes, within float32
    rounding, and the LoRA layers keep no hook after it, also after a pass that failed."""
    fused = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=BatchSettings(max_batch=1))
    assert use_few_rows_kernel(fused.model, min_weights=0) > 0  # the tiny model's layers too: 2-row passes
    apart = unfused(make_tiny_pair(tiny_base, smollm2_tokenizer, batching=BatchSettings(max_batch=1)))
    assert forward.fused(fused) and not forward.fused(apart)
    for prompt, (tree, commit) in zip(PROMPTS, TREES, strict=True):
        got = fused.tracked(steps, fused, prompt, tree, commit)
        want = apart.tracked(steps, apart, prompt, tree, commit)
        for (wu, wb), (gu, gb) in zip(want, got, strict=True):
            np.testing.assert_allclose(gu, wu, atol=1e-4)
            np.testing.assert_allclose(gb, wb, atol=1e-4)
            assert not np.allclose(gu, gb)
    assert all(not layer._forward_pre_hooks for layer in fused.adapter_layers)
    job = TreeJob(
        ids=[1, 2],
        allowed=torch.ones((2, 2), dtype=torch.bool),
        positions=torch.arange(2),
        keep=[5],  # out of range: the head's gather fails inside the pass
        caches={Side.U: _empty_cache(), Side.B: _empty_cache()},
    )
    with pytest.raises(IndexError):
        fused.forward_trees([job])
    assert all(not layer._forward_pre_hooks for layer in fused.adapter_layers)
    assert job.caches[Side.U].get_seq_length() == job.caches[Side.B].get_seq_length() == 0


def _empty_cache():
    from transformers import DynamicCache

    return DynamicCache()


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (1, 3), (3, 1), (2, 2), (4, 1), (5, 1), (1, 40), (1, 64), (2, 40)])
def test_the_few_rows_linear_gives_linears_values(shape):
    """``W · xᵀ`` for 1 to MAX_ROWS rows (one row as two), ``linear`` otherwise and wherever
    autograd is on."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(576, 1536)
    x = torch.randn(*shape, 576)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert use_few_rows_kernel(layer) == 1
        got = layer(x)
    assert got.shape == want.shape
    rows = shape[0] * shape[1]
    if rows <= MAX_ROWS:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)
    y = layer(x.requires_grad_())  # training: linear, with its gradients
    assert torch.equal(y.detach(), want) and y.requires_grad


def test_only_large_linear_layers_get_the_few_rows_kernel(tiny_base, smollm2_tokenizer):
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    lora_factors = [m for layer in pair.adapter_layers for m in (*layer.lora_A.values(), *layer.lora_B.values())]
    assert use_few_rows_kernel(pair.model, min_weights=0) > 0
    assert all("forward" in m.__dict__ for m in lora_factors)  # min_weights 0: every Linear
    fresh = make_tiny_pair(tiny_base, smollm2_tokenizer)  # LocalPair: the default threshold
    linear = [m for m in fresh.model.modules() if type(m) is torch.nn.Linear]
    patched = [m for m in linear if "forward" in m.__dict__]
    assert patched and patched == [m for m in linear if m.weight.numel() >= MIN_WEIGHTS]


@pytest.mark.parametrize("rows", [2, 3, 8])
def test_the_few_rows_product_takes_a_column_major_input(rows):
    """A column-major ``x`` (the transposed output of an earlier product, as the lean body's
    layers pass on) gives the values of a row-major one: it is multiplied as a row-major copy."""
    from proxy.pair.few_rows import product

    torch.manual_seed(0)
    weight, x = torch.randn(576, 1536) / 40, torch.randn(rows, 1536)  # outputs of about 1
    column_major = x.t().contiguous().t()
    assert not column_major.is_contiguous() and torch.equal(column_major, x)
    with torch.inference_mode():
        assert torch.equal(product(column_major, weight), product(x, weight))
        torch.testing.assert_close(product(x, weight), x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_prefix_cache_prefers_the_entry_that_holds_both_models():
    """Two entries share a system prompt; the first was stored while U's cache was behind (B's
    keys alone): a third prompt with that head gets the second's, U's included."""
    from proxy.pair.prefix_cache import PrefixCache

    class Layer:
        def __init__(self, n):
            self.keys, self.values = torch.full((1, 2, n, 4), float(n)), torch.full((1, 2, n, 4), float(n))

    class Cache:
        def __init__(self, n):
            self.layers, self.n = [Layer(n)], n

        def get_seq_length(self):
            return self.n

    head = list(range(20))
    cache = PrefixCache(max_tokens=200)
    cache.store(head + [100, 101], {Side.B: Cache(22), Side.U: Cache(0)}, (Side.U, Side.B))  # U behind: none
    cache.store(head + [200, 201], {Side.B: Cache(22), Side.U: Cache(22)}, (Side.U, Side.B))
    got, kv = cache.lookup(head + [300, 301], 22)
    assert got == 20 and set(kv) == {Side.U, Side.B} and kv[Side.U][0][0].shape == (1, 2, 20, 4)
    # an entry with more shared tokens still wins over one holding more models
    cache.store(head + [300], {Side.B: Cache(21), Side.U: Cache(5)}, (Side.U, Side.B))
    got, kv = cache.lookup(head + [300, 301], 22)
    assert got == 21 and kv[Side.U][0][0].shape == (1, 2, 5, 4)
