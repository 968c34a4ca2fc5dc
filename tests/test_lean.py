"""The pair's lean decoder body (proxy.pair.lean.LeanDecoder): the rows and caches of
transformers' modules, on a tiny random Llama with grouped-query attention and a LoRA
adapter, through the pair's batched passes (prompts, trees after a cache, one token)."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import make_tiny_pair
from test_pair_batching import NEXT, PROMPTS, TREES

from proxy.decoding.alignment import Tree
from proxy.pair.batcher import BatchSettings
from proxy.pair.lean import LeanDecoder
from proxy.pair.scorer import PairScorer
from proxy.pair.sides import Side


def steps(pair, prompt, tree, commit, start=None):
    ids = pair.prompt_ids(prompt=prompt)
    if start is not None:
        start.wait()
    scorer = PairScorer(pair)
    chain = Tree(tuple(ids), tuple(range(-1, len(ids) - 1)))
    out = [scorer.score(chain, len(ids)), scorer.score(tree, commit), scorer.score(NEXT, 1), scorer.score(NEXT, 1)]
    return [(u.copy(), b.copy()) for u, b in out]


def modules_only(pair):
    """``pair`` on transformers' modules (the reference)."""
    pair.lean = {}
    return pair


@pytest.mark.parametrize("fuse", [True, False], ids=["U-and-B-in-one-pass", "a-pass-per-model"])
@pytest.mark.parametrize("batched", [True, False], ids=["three-requests-batched", "one-at-a-time"])
def test_lean_passes_give_the_modules_rows(tiny_base, smollm2_tokenizer, fuse, batched):
    ref = modules_only(make_tiny_pair(tiny_base, smollm2_tokenizer, batching=BatchSettings(max_batch=1)))
    ref.fuse_sides = False
    lean = make_tiny_pair(
        tiny_base, smollm2_tokenizer, batching=BatchSettings(max_batch=8, window_s=10.0) if batched else None
    )
    lean.fuse_sides = fuse
    assert lean.lean[Side.U] is lean.lean[Side.B] and lean.lean[Side.U].has_lora
    want = [steps(ref, p, t, c) for p, (t, c) in zip(PROMPTS, TREES, strict=True)]
    if batched:
        start = threading.Barrier(len(PROMPTS))
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(
                pool.map(lambda a: lean.tracked(steps, lean, a[0], *a[1], start), zip(PROMPTS, TREES, strict=True))
            )
        assert lean.batcher.passes == 4 and lean.batcher.jobs == 12
    else:
        got = [steps(lean, p, t, c) for p, (t, c) in zip(PROMPTS, TREES, strict=True)]
    for w, g in zip(want, got, strict=True):
        for (wu, wb), (gu, gb) in zip(w, g, strict=True):
            np.testing.assert_allclose(gu, wu, atol=1e-4)
            np.testing.assert_allclose(gb, wb, atol=1e-4)
            assert not np.allclose(gu, gb)  # the adapter is on for U's rows only


def test_the_modules_share_the_lean_weights_and_compute_what_they_did(tiny_base, smollm2_tokenizer):
    net = copy.deepcopy(tiny_base)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.inference_mode():
        before = net(input_ids=ids).logits
    decoder = LeanDecoder.build(net)
    assert decoder is not None and not decoder.has_lora
    with torch.inference_mode():
        after = net(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    layer, lean = net.model.layers[0], decoder._layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    # q, k and v are rows of one matrix, gate and up another; the down projection its own: one copy of each weight
    assert attn.q_proj.weight.data_ptr() == lean.qkv.weight.data_ptr()
    assert attn.v_proj.weight.data_ptr() == lean.qkv.weight[-attn.v_proj.weight.shape[0] :].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == lean.gate_up.weight[mlp.gate_proj.weight.shape[0] :].data_ptr()
    assert mlp.down_proj.weight.data_ptr() == lean.down.weight.data_ptr() and lean.down.weight.is_contiguous()


def test_other_models_and_adapters_keep_the_modules(tiny_base, smollm2_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    assert LeanDecoder.build(gpt2) is None
    head = get_peft_model(copy.deepcopy(tiny_base), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert LeanDecoder.build(head) is None  # an adapter on the output head
    dora = get_peft_model(copy.deepcopy(tiny_base), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert LeanDecoder.build(dora) is None
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    assert set(pair.lean) == {Side.U, Side.B}


def test_a_cache_grows_in_its_own_buffer_and_never_writes_into_views_it_was_given():
    from transformers import DynamicCache

    from proxy.pair.lean import _append

    held = torch.arange(2 * 5 * 4, dtype=torch.float32).view(1, 2, 5, 4)  # a prefix cache's entry
    kept = held.clone()
    cache = DynamicCache(ddp_cache_data=[(held[:, :, :3], held[:, :, :3])])
    new = torch.full((1, 2, 1, 4), -1.0)
    keys, _ = _append(cache, 0, new, new)
    assert keys.shape == (1, 2, 4, 4) and torch.equal(held, kept)  # copied out, not written past the view
    torch.testing.assert_close(keys[:, :, :3], kept[:, :, :3])
    first = keys.data_ptr()
    keys, _ = _append(cache, 0, new * 2, new * 2)
    assert keys.data_ptr() == first and keys.shape[2] == 5  # in place, in its own buffer
    cache.crop(-2)
    keys, _ = _append(cache, 0, new * 3, new * 3)
    assert keys.shape[2] == 4 and torch.equal(keys[:, :, 3:], new * 3) and torch.equal(held, kept)


def test_the_pairs_passes_run_on_the_one_compute_thread(tiny_base, smollm2_tokenizer, monkeypatch):
    from proxy.pair import compute, forward

    seen = []
    real = forward.forward_trees

    def recording(pair, jobs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(pair, jobs)

    monkeypatch.setattr("proxy.pair.local.forward_trees", recording)
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer, batching=BatchSettings(max_batch=4))
    threads = list(pair.executor.map(lambda p: (steps(pair, p, *TREES[0]), torch.get_num_threads())[1], PROMPTS))
    assert threads == [1, 1, 1]  # the request threads run torch single-threaded
    assert seen and all(s == (seen[0][0], compute.threads()) for s in seen) and seen[0][0].startswith("pair-compute")


def test_no_tensor_views_the_weights_file_after_the_build(tiny_base, tmp_path):
    """transformers maps the weights file; the re-laid weights' old pages would stay resident
    while any tensor viewed the mapping."""
    from transformers import AutoModelForCausalLM

    copy.deepcopy(tiny_base).save_pretrained(tmp_path)
    net = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)

    def mapped() -> bool:
        with open("/proc/self/maps") as maps:
            return any(str(tmp_path) in line for line in maps)

    if not mapped():
        pytest.skip("transformers read the weights without mapping the file")
    assert LeanDecoder.build(net) is not None
    import gc

    gc.collect()
    assert not mapped()


def test_passes_of_many_rows_run_lean_where_padding_would_waste_positions():
    """More than LEAN_MAX_ROWS rows: the lean body (tokens packed) where padding would be a
    quarter of the positions or more, the modules' batched attention where rows are alike."""
    from types import SimpleNamespace

    from proxy.pair import forward

    class Decoder:
        has_lora = True

    decoder = Decoder()
    pair = SimpleNamespace(lean={Side.U: decoder, Side.B: decoder}, u_model=None, has_offset=True)

    def rows(*widths):
        return [(SimpleNamespace(ids=[0] * w), side) for side in (Side.U, Side.B) for w in widths]

    assert forward._lean(pair, rows(1, 9, 2)) == (decoder, True)  # 6 rows: lean whatever the widths
    assert forward._lean(pair, rows(*[1] * 8)) is None  # 16 one-token rows: no padding
    assert forward._lean(pair, rows(*[8] * 7, 6)) is None  # 3% padding
    assert forward._lean(pair, rows(*[8] * 6, 1, 2)) is None  # 102 of 128 positions real: 20% padding
    assert forward._lean(pair, rows(*[8] * 5, 1, 1, 1)) == (decoder, True)  # 86 of 128: 33% padding
    assert forward._lean(SimpleNamespace(**{**vars(pair), "lean": {}}), rows(1, 9)) is None
