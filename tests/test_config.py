"""Configuration and command line: bad settings give a clear message naming the key, exit 2, no traceback."""

from __future__ import annotations

import pytest

from proxy.cli import main


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
