"""Shared prefixes in a training batch (proxy.training.prefix): the split, and the hidden
states and LoRA gradients against one plain pass, on a tiny random model with SmolLM2's
tokenizer and chat template."""

from __future__ import annotations

import copy

import pytest
import torch

from proxy.decoding.vocab import ByteVocab
from proxy.training.data import Example, collate, encode
from proxy.training.prefix import MIN_SAVING, plan_prefixes, shared_hidden

QUESTION = [{"role": "user", "content": "Who is Harry Potter's best friend?"}]
OTHER = [{"role": "user", "content": "Which school does Harry Potter go to?"}]


def rows_of(tokenizer, examples):
    eot = ByteVocab.from_tokenizer(tokenizer).eot_ids[0]
    return [encode(e, tokenizer, eot, 256) for e in examples]


def test_a_split_shares_the_common_start_and_each_question_once():
    system, q1, q2 = [1, 2, 3, 4, 5, 6], list(range(10, 22)), list(range(30, 42))
    rows = [
        system + q1 + [100, 101],
        system + q2 + [102],
        system + q1 + [103, 104, 105],
        system + [7, 8, 9],  # shares the system prompt only
        system + q1 + [106],
        system + q2 + [107, 108],
    ]
    plan = plan_prefixes(rows)
    assert plan is not None and plan.common == len(system)
    groups = {frozenset(members): length for members, length in plan.groups}
    assert groups == {frozenset({0, 2, 4}): len(q1), frozenset({1, 5}): len(q2), frozenset({3}): 0}
    for i, row in enumerate(rows):  # every row keeps a token of its own, its prefix is its own start
        members, length = plan.groups[plan.group_of[i]]
        assert i in members and plan.common + length < len(row)
    assert plan.computed < len(rows) * max(len(r) for r in rows)


def test_nothing_shared_or_too_little_saved_is_no_split():
    assert plan_prefixes([[1, 2, 3]]) is None
    assert plan_prefixes([[1, 2, 3], [4, 5, 6], [7, 8]]) is None
    # two rows sharing a start that saves fewer than MIN_SAVING passes, beside one sharing nothing
    short = list(range(50, 50 + MIN_SAVING - 2))
    assert plan_prefixes([[9, *short, 1], [8, 2], [9, *short, 3]]) is None
    longer = list(range(50, 50 + MIN_SAVING))
    plan = plan_prefixes([[9, *longer, 1], [8, 2], [9, *longer, 3]])
    assert plan is not None and plan.common == 0
    assert sorted((sorted(m), length) for m, length in plan.groups) == [([0, 2], MIN_SAVING + 1), ([1], 0)]


@pytest.fixture
def lora_model(tiny_base):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    return get_peft_model(
        copy.deepcopy(tiny_base),
        LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False),
    )


def test_shared_prefixes_give_the_plain_pass_hidden_states_and_gradients(lora_model, smollm2_tokenizer):
    examples = [
        Example(QUESTION, "Ron Weasley."),
        Example(QUESTION, "Harry Potter's best friend is Ron Weasley, a loyal wizard."),
        Example(OTHER, "Hogwarts School of Witchcraft and Wizardry."),
        Example(QUESTION, "His best friend is Ron."),
        Example(OTHER, "He goes to Hogwarts."),
        Example([{"role": "user", "content": "What do bees make?"}], "Bees make honey."),
        Example(OTHER, " ".join(["He goes to Hogwarts School of Witchcraft and Wizardry in Scotland."] * 4)),
    ]
    batch = collate(rows_of(smollm2_tokenizer, examples), smollm2_tokenizer.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    plan = plan_prefixes([r[: int(n)].tolist() for r, n in zip(ids, mask.sum(-1), strict=True)])
    assert plan is not None and plan.common > 0 and sum(length > 0 for _, length in plan.groups) == 2
    assert len(plan.buckets) == 2  # the long answer runs in a pass of its own
    attended = mask.bool()
    params = [p for p in lora_model.parameters() if p.requires_grad]
    weights = torch.randn(*ids.shape, lora_model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def plain():
        return lora_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    def grads(hidden):
        loss = (hidden[attended] * weights[attended]).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    want, got = plain(), shared_hidden(lora_model, ids, mask)
    assert got is not None and got.shape == want.shape
    assert torch.allclose(got[attended], want[attended], atol=1e-5)
    assert torch.all(got[~attended] == 0)
    g_want, g_got = grads(plain()), grads(shared_hidden(lora_model, ids, mask))
    assert ((g_got - g_want).norm() / g_want.norm()).item() < 1e-5, ((g_got - g_want).norm() / g_want.norm()).item()


def test_left_padding_or_a_sliding_window_runs_the_plain_pass(lora_model, smollm2_tokenizer):
    batch = collate(rows_of(smollm2_tokenizer, [Example(QUESTION, "Ron."), Example(QUESTION, "Ron Weasley.")]), 0)
    left = {k: v.flip(-1) for k, v in batch.items()}
    assert shared_hidden(lora_model, left["input_ids"], left["attention_mask"]) is None
    windowed = copy.deepcopy(lora_model)
    windowed.config.sliding_window, windowed.config.use_sliding_window = 16, True
    assert shared_hidden(windowed, batch["input_ids"], batch["attention_mask"]) is None
    assert shared_hidden(lora_model, batch["input_ids"], batch["attention_mask"]) is not None


def test_decoding_from_a_shared_prefill_gives_the_same_answers(lora_model, smollm2_tokenizer, monkeypatch):
    """Greedy answers with the offset and answers sampled at T = 1, from prompts that share the
    system prompt and repeat questions, are the same token for token with and without the
    shared prefill, and so are their margins and B's log-probabilities (to float rounding)."""
    from proxy.training.greedy import PairModels, greedy_decode

    pair = PairModels(lora_model.eval(), smollm2_tokenizer, ByteVocab.from_tokenizer(smollm2_tokenizer).eot_ids)
    prompts = [QUESTION, OTHER, QUESTION, [{"role": "user", "content": "What do bees make?"}], OTHER]
    rows = [pair.prompt_ids(p) for p in prompts]
    done = pair.prefill("U", rows)
    assert done is not None
    logits, _, mask, last = done
    for row, got, n in zip(rows, logits, last[:, 0], strict=True):  # each prompt alone, in one plain pass
        want = lora_model(input_ids=torch.tensor([row])).logits[0, -1]
        assert torch.allclose(got, want, atol=1e-5) and int(n) == len(row) - 1
    assert mask.shape[1] < sum(len(r) for r in rows)

    def answers():
        return [
            *greedy_decode(pair, prompts, alpha=1.0, threshold=None, max_tokens=12),
            *greedy_decode(pair, prompts, alpha=0.0, threshold=float("inf"), max_tokens=12, temperature=1.0, seed=4),
        ]

    shared = answers()
    monkeypatch.setattr(PairModels, "prefill", lambda self, side, rows: None)
    whole = answers()
    assert [d.tokens for d in shared] == [d.tokens for d in whole]
    assert all(len(d.tokens) > 0 for d in shared)
    for a, b in zip(shared, whole, strict=True):
        assert abs(a.margin - b.margin) < 1e-3 and abs(a.logprob - b.logprob) < 1e-4


def test_rows_own_tokens_run_in_passes_of_similar_length():
    from proxy.training.prefix import MAX_BUCKETS, PASS_COST, length_buckets

    assert length_buckets([5, 6, 5]) == ((0, 1, 2),)  # one pass: padding saves less than a pass costs
    lengths = [4, 60, 5, 58, 6, 3, 61, 4, 5, 6, 4, 5]
    buckets = length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths))) and len(buckets) <= MAX_BUCKETS
    assert {frozenset(b) for b in buckets} == {frozenset({1, 3, 6}), frozenset(set(range(12)) - {1, 3, 6})}

    def cost(split):
        return sum(len(b) * max(lengths[i] for i in b) + PASS_COST for b in split)

    assert cost(buckets) < cost((tuple(range(len(lengths))),))
