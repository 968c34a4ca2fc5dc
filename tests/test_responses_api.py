"""``POST /v1/responses`` through the official openai SDK (``client.responses.create`` and
``client.responses.stream``): text, logprobs, usage, refusals and errors as the SDK expects."""

from __future__ import annotations

import openai
import pytest
from fakes import FakeRemote, script
from test_strategies import WordPair, story

from proxy.decoding.served import ServedModel
from proxy.server.app import create_app

WORDS = ["Hi", " there", ",", " friend", "."]


async def _client(aiohttp_client, models):
    client = await aiohttp_client(create_app(models))
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="none", max_retries=0), client


async def test_create_gives_text_usage_and_the_same_answer_as_chat(aiohttp_client):
    model = ServedModel("m", FakeRemote(script(WORDS)))
    oa, _ = await _client(aiohttp_client, {"m": model})
    async with oa:
        r = await oa.responses.create(model="m", input="Hello?", instructions="Be brief.", temperature=0)
        chat = await oa.chat.completions.create(
            model="m",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}],
            temperature=0,
        )
        assert r.output_text == chat.choices[0].message.content == "Hi there, friend."
        assert r.status == "completed" and r.object == "response" and r.id.startswith("resp_")
        assert r.output[0].type == "message" and r.output[0].role == "assistant"
        assert r.usage.output_tokens == chat.usage.completion_tokens and r.usage.total_tokens == (
            r.usage.input_tokens + r.usage.output_tokens
        )
        assert r.instructions == "Be brief."

        short = await oa.responses.create(model="m", input="Hello?", temperature=0, max_output_tokens=2)
        assert short.output_text == "Hi there" and short.status == "incomplete"
        assert short.incomplete_details.reason == "max_output_tokens"

        items = await oa.responses.create(
            model="m",
            input=[
                {"role": "user", "content": "Hello?"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hi.", "annotations": []}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Again?"}]},
            ],
            temperature=0,
        )
        assert items.output_text == "Hi there, friend."


async def test_logprobs_come_with_the_output_text_and_in_the_stream_without_bytes(aiohttp_client):
    model = ServedModel("m", FakeRemote(script(WORDS)))
    oa, _ = await _client(aiohttp_client, {"m": model})
    async with oa:
        r = await oa.responses.create(
            model="m", input="Hello?", temperature=0, include=["message.output_text.logprobs"], top_logprobs=2
        )
        lps = r.output[0].content[0].logprobs
        assert [x.token for x in lps] == WORDS
        assert all(len(x.top_logprobs) == 2 and x.bytes == list(x.token.encode()) for x in lps)
        chat = await oa.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hello?"}], temperature=0, logprobs=True, top_logprobs=2
        )
        assert [x.logprob for x in lps] == [x.logprob for x in chat.choices[0].logprobs.content]

        async with oa.responses.stream(
            model="m", input="Hello?", temperature=0, include=["message.output_text.logprobs"], top_logprobs=2
        ) as stream:
            kinds, deltas = [], []
            async for event in stream:
                kinds.append(event.type)
                if event.type == "response.output_text.delta":
                    deltas.append(event)
            final = await stream.get_final_response()
        assert final.output_text == "Hi there, friend." and final.status == "completed"
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert "".join(d.delta for d in deltas) == "Hi there, friend."
        entries = [e.model_dump() for d in deltas for e in d.logprobs]
        assert [e["token"] for e in entries] == WORDS and all("bytes" not in e for e in entries)
        assert final.usage.output_tokens == chat.usage.completion_tokens  # the end of turn counted, as on chat


async def test_a_refusal_is_a_refusal_part(aiohttp_client):
    """Sequence mode's scope action "refuse" (every sample in forget scope)."""
    always = FakeRemote(
        lambda prefix: {b"": story(b"")[:1], b" The": story(b" The")[:1]}.get(prefix, story(b" out")),
        can_continue=False,
    )
    model = ServedModel(
        "m", always, pair=WordPair(), mode="sequence", offset_threshold=1.0, offset_scope="token", refusal="No."
    )
    oa, _ = await _client(aiohttp_client, {"m": model})
    async with oa:
        r = await oa.responses.create(model="m", input="Tell me.", temperature=0)
        part = r.output[0].content[0]
        assert part.type == "refusal" and part.refusal == "No." and r.output_text == ""
        async with oa.responses.stream(model="m", input="Tell me.", temperature=0) as stream:
            kinds = [e.type async for e in stream]
            final = await stream.get_final_response()
        assert "response.refusal.done" in kinds and final.output[0].content[0].type == "refusal"
        # chat: OpenAI's refusal field, content null, streamed as delta.refusal
        messages = [{"role": "user", "content": "Tell me."}]
        chat = await oa.chat.completions.create(model="m", messages=messages, temperature=0)
        assert chat.choices[0].message.refusal == "No." and chat.choices[0].message.content is None
        chunks = [
            c async for c in await oa.chat.completions.create(model="m", messages=messages, temperature=0, stream=True)
        ]
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.refusal or "" for d in deltas) == "No." and not "".join(d.content or "" for d in deltas)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"text": {"format": {"type": "json_object"}}}, "text"),
        ({"max_output_tokens": 10**9}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"max_tool_calls": -3}, "max_tool_calls"),
    ],
)
async def test_fields_the_proxy_cannot_honour_are_refused_by_name(aiohttp_client, extra, param):
    model = ServedModel("m", FakeRemote(script(WORDS)))
    oa, _ = await _client(aiohttp_client, {"m": model})
    async with oa:
        with pytest.raises(openai.BadRequestError) as err:
            await oa.responses.create(model="m", input="Hello?", **extra)
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body


async def test_bad_bodies_get_4xx_never_5xx(aiohttp_client):
    model = ServedModel("m", FakeRemote(script(WORDS)))
    _, client = await _client(aiohttp_client, {"m": model})
    bad = [
        b"not json",
        b"[]",
        b'{"model": "m"}',
        b'{"model": "m", "input": ""}',
        b'{"model": "m", "input": []}',
        b'{"model": "m", "input": 5}',
        b'{"model": "m", "input": [{"role": "tool", "content": "x"}]}',
        b'{"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}',
        b'{"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}',
        b'{"model": "m", "input": "\\ud800"}',
        b'{"model": "m", "input": "Hi", "bogus": 1}',
        b'{"model": "nope", "input": "Hi"}',
        b'{"model": "m", "input": "Hi", "max_output_tokens": "5"}',
        b'{"model": "m", "input": "Hi", "metadata": {"k": "\\ud800"}}',
        b'{"model": "m", "input": "Hi", "metadata": {"\\ud800": "v"}}',
        b'{"model": "m", "input": "Hi", "user": "\\ud800"}',
        b'{"model": "m", "input": "Hi", "stream_options": {"include_obfuscation": false}}',
    ]
    for body in bad:
        r = await client.post("/v1/responses", data=body, headers={"Content-Type": "application/json"})
        assert 400 <= r.status < 500, (body, r.status, await r.text())
        err = (await r.json())["error"]
        assert err["message"] and "Traceback" not in err["message"]


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ({"type": "function_call_output", "call_id": "c", "output": "x"}, "input[0] is a 'function_call_output' item"),
        ({"type": "reasoning", "summary": []}, "input[0] is a 'reasoning' item"),
        (
            {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]},
            "input[0].content[0] is a 'input_image' part",
        ),
    ],
)
async def test_items_the_proxy_cannot_take_are_named(aiohttp_client, item, says):
    model = ServedModel("m", FakeRemote(script(WORDS)))
    _, client = await _client(aiohttp_client, {"m": model})
    r = await client.post("/v1/responses", json={"model": "m", "input": [item]})
    err = (await r.json())["error"]
    assert r.status == 400 and err["param"] == "input" and says in err["message"], err


async def test_errors_name_the_responses_fields(aiohttp_client):
    """A chat-side refusal reaches a Responses client under the Responses API's own names."""
    model = ServedModel("m", FakeRemote(script(WORDS), can_continue=False), mode="sequence")
    _, client = await _client(aiohttp_client, {"m": model})
    r = await client.post(
        "/v1/responses",
        json={"model": "m", "input": "Hi", "include": ["message.output_text.logprobs"], "top_logprobs": 2},
    )
    err = (await r.json())["error"]
    assert r.status == 400 and err["param"] == "include" and err["message"].startswith("include: "), err
    # an earlier assistant refusal is text the proxy passes on
    r = await client.post(
        "/v1/responses",
        json={
            "model": "m",
            "input": [
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
                {"role": "user", "content": "Hi"},
            ],
        },
    )
    assert r.status == 200, await r.text()


async def test_chat_fields_that_do_not_change_the_distribution_are_accepted(aiohttp_client):
    """What the current SDK may send on chat completions and that leaves the sampled
    distribution alone is accepted (and not acted on); a response_format that is not
    {"type": "text"} is refused by name."""
    model = ServedModel("m", FakeRemote(script(WORDS)))
    oa, _ = await _client(aiohttp_client, {"m": model})
    messages = [{"role": "user", "content": "Hello?"}]
    async with oa:
        reply = await oa.chat.completions.create(
            model="m",
            messages=messages,
            safety_identifier="user-1234",
            prompt_cache_key="conversation-7",
            service_tier="auto",
            response_format={"type": "text"},
            temperature=0,
        )
        assert reply.choices[0].message.content == "".join(WORDS)
        stream = await oa.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_obfuscation": False}, temperature=0
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "".join(WORDS)
        for bad in ({"foo": 1}, {"type": "json_object"}):
            with pytest.raises(openai.BadRequestError) as err:
                await oa.chat.completions.create(model="m", messages=messages, response_format=bad)
            assert err.value.body["param"] == "response_format"
