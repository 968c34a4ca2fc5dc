"""Configuration and command line: bad settings give a clear message naming the key, exit 2, no traceback."""

from __future__ import annotations

import pytest

from proxy.cli.main import main


def write(tmp_path, text: str | bytes):
    p = tmp_path / "proxy.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


REMOTE = '[models.m]\nbackend = "openai-completions"\nbase_url = "http://127.0.0.1:9/v1"\ntemplate = "chatml"\n'


@pytest.mark.parametrize(
    "config,expected",
    [
        ("[models.m\n", "not valid TOML"),
        (b"\xff\xfe garbage", "not UTF-8"),
        (REMOTE + "bogus_key = 1\n", "models.m.bogus_key"),
        ('[models.m]\nbackend = "openai-chat"\n', "base_url is required"),
        (REMOTE + 'pair = "nosuchpair"\n', "models.m.pair"),
        (REMOTE + 'api_key_env = "DELTAPROXY_TEST_UNSET_KEY"\n', "DELTAPROXY_TEST_UNSET_KEY is not set"),
        (REMOTE + "alpha = nan\n", "models.m.alpha"),
        ("[server]\nport = 70000\n" + REMOTE, "server.port"),
    ],
)
def test_bad_config_files(tmp_path, capsys, config, expected):
    assert main(["serve", "--config", write(tmp_path, config)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["serve", "--alpha", "nan"], "alpha"),
        (["serve", "--alpha", "1000"], "alpha"),
        (["serve", "--offset", "/nonexistent/offset"], "/nonexistent/offset"),
        (["serve", "--offset-threshold", "-1"], "offset_threshold"),
        (["serve", "--offset", "/x", "--no-offset"], "exclude each other"),
        (["serve", "--config", "x.toml", "--no-offset"], "apply to the embedded default"),
    ],
)
def test_bad_flags_for_the_embedded_default(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_bad_port_is_refused_before_loading_anything(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "99999"])
    assert info.value.code == 2 and "not a port" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("policy", "value", "ok"),
    [
        ("at_least", 2.0, True),
        ("at_least", 1.0, True),
        ("at_least", 0.0, False),
        ("at_least", -3.0, False),
        ("any", 0.0, True),
        ("any", -3.0, True),
        ("none", 2.0, False),
    ],
)
async def test_a_request_may_not_weaken_the_offset_unless_allowed(aiohttp_client, policy, value, ok):
    """``client_alpha``: by default a request may raise α but not lower it (no client can switch
    the unlearning off); "any" allows every α; "none" refuses the field. A refusal is a 400
    naming offset_alpha, and the request without the field still works."""
    from fakes import FakeRemote, script

    from proxy.decoding.served import ServedModel
    from proxy.server.app import create_app

    model = ServedModel("m", FakeRemote(script(["a", "b"])), alpha=1.0, client_alpha=policy)
    client = await aiohttp_client(create_app({"m": model}, batches=False))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = await client.post("/v1/chat/completions", json={**body, "offset_alpha": value})
    if ok:
        assert r.status == 200, await r.text()
    else:
        assert r.status == 400
        err = (await r.json())["error"]
        assert err["param"] == "offset_alpha" and err["code"] == "offset_alpha_not_allowed"
        assert "offset_alpha" in err["message"]
    assert (await client.post("/v1/chat/completions", json=body)).status == 200


def test_client_alpha_defaults_to_at_least_and_the_demo_allows_any():
    from proxy.config import ModelConfig, embedded_default

    assert ModelConfig(backend="llama-inprocess", gguf="smollm2").client_alpha == "at_least"
    assert embedded_default().models["smollm2-demo"].client_alpha == "any"


async def test_a_served_model_built_outside_the_config_lets_no_client_lower_alpha(aiohttp_client):
    """:class:`ServedModel`'s own default is the config's (``at_least``): a model built in code
    without ``client_alpha`` lets no request switch the unlearning off with ``offset_alpha`` 0."""
    from fakes import FakeRemote, script

    from proxy.config import ModelConfig
    from proxy.decoding.served import ServedModel
    from proxy.server.app import create_app

    model = ServedModel("m", FakeRemote(script(["a", "b"])), alpha=1.0)
    assert model.client_alpha == ModelConfig.model_fields["client_alpha"].default == "at_least"
    client = await aiohttp_client(create_app({"m": model}, batches=False))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "offset_alpha": 0}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status == 400 and (await r.json())["error"]["code"] == "offset_alpha_not_allowed"


def test_the_objective_names_are_the_objectives():
    """The command line offers (``TrainConfig.objective``'s type) exactly the objectives that training has."""
    from proxy.common.literals import ObjectiveName, values
    from proxy.training.objectives import OBJECTIVES

    assert values(ObjectiveName) == tuple(OBJECTIVES)
