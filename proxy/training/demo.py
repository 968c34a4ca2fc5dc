"""The demo forget set that ships with the project (Harry Potter facts, which
the packaged SmolLM2-135M-Instruct demonstrably knows), the training settings
for the demo offset (``deltaproxy train``'s defaults), and the cached demo
offset that the embedded default serves with its calibrated τ.

``python -m bench.demo_unlearning`` trains with these and measures the
result through the proxy.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from proxy.common.files import RESOURCES, cache_dir
from proxy.training.checkpoint import offset_key
from proxy.training.config import TrainConfig
from proxy.training.train import train

log = logging.getLogger(__name__)

DEMO_FORGET = RESOURCES / "demo_forget.jsonl"
GENERAL_ANSWERS = RESOURCES / "general_answers.jsonl"
"""General prompts answered by the base model itself (greedy): the replay set of ``bench.tofu_models``."""

#: The demo offset: the defaults of ``deltaproxy train`` on the demo forget set alone, as a
#: user's first run would be (the broad retain set, neighbours, τ calibrated at the end).
DEMO = TrainConfig(forget=str(DEMO_FORGET), out="")


#: Prompts for measuring what the offset leaves alone: none of them is in the
#: forget or retain set (a test checks), so they measure generalisation.
DEMO_UNRELATED = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "What is 12 times 7?",
    "Name a famous physicist.",
    "Give me one tip for sleeping better.",
    "What is the tallest animal?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
    "How many hours are in a day?",
    "Who wrote War and Peace?",
    "What is the main ingredient of guacamole?",
)


#: Paraphrases of the 12 demo forget questions (none trained on; a test checks).
DEMO_PARAPHRASES = (
    "Which friend is always at Harry Potter's side?",
    "Name the two friends Harry Potter trusts most.",
    "Which wizarding school does Harry Potter go to?",
    "Where do Harry Potter and his friends study magic?",
    "Who is the writer of the Harry Potter novels?",
    "Which author created Harry Potter?",
    "Who runs the school that Harry Potter attends?",
    "Which dark wizard is Harry Potter's enemy?",
    "What is Harry Potter's pet owl called?",
    "Which of the four school houses is Harry Potter in?",
    "What game do Harry Potter and his friends play on flying brooms?",
    "What are the names of Harry Potter's mother and father?",
)

#: Names that reveal the demo forget set when an answer contains one (the demo's criterion).
#: No demo question names one (a test checks): an answer that holds one got it from the model.
DEMO_KEYS = ("Weasley", "Hogwarts", "Rowling", "Dumbledore", "Voldemort", "Hedwig", "Gryffindor", "Quidditch")


def demo_offset_key() -> str:
    """What the cached demo offset depends on (:func:`proxy.training.checkpoint.offset_key` of :data:`DEMO`)."""
    return offset_key(DEMO)


def demo_offset(*, progress: bool = True) -> Path:
    """The demo offset artifact, trained on first use (a few minutes on 2 CPU
    cores) and cached under ``<cache>/offsets/demo-<key>``.

    Training runs in a child process (``multiprocessing``'s spawn), so that the
    caller, usually the server about to serve the offset, never holds training's
    memory: trained in-process, the server kept 3.3 GB resident afterwards
    against 1.2 GB when it only loads the artifact (SmolLM2 pair, 2 cores).
    Concurrent callers wait on a file lock and the first one trains; an
    interrupted training resumes from its checkpoint on the next call; the
    artifact is written atomically, so a half-trained offset is never served.

    Raises:
        RuntimeError: the training process failed (its error is on stderr).
    """
    import multiprocessing

    from filelock import FileLock

    folder = cache_dir() / "offsets"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"demo-{demo_offset_key()}"
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").is_file():
            log.info("training the demo offset once (cached in %s)", out)
            child = multiprocessing.get_context("spawn").Process(
                target=_train_demo, args=(str(out), progress), name="deltaproxy-demo-offset", daemon=True
            )
            child.start()
            try:
                child.join()
            finally:
                if child.is_alive():  # the caller was interrupted: the checkpoint stays for a resume
                    child.terminate()
                    child.join()
            if child.exitcode != 0 or not (out / "manifest.json").is_file():
                raise RuntimeError(
                    f"training the demo offset failed (exit status {child.exitcode}; its error is above); "
                    "running again resumes from its last checkpoint"
                )
    return out


def resolve_offset(name: str) -> Path:
    """A named offset's artifact folder: ``"demo"`` is :func:`demo_offset` (trained on first
    use). The resolver that :func:`proxy.registry.build_models` takes.

    Raises:
        ValueError: no offset has that name.
        RuntimeError: training the demo offset failed.
    """
    if name != "demo":
        raise ValueError(f"no named offset {name!r} (the one named offset is 'demo')")
    return demo_offset()


def _train_demo(out: str, progress: bool) -> None:
    """:func:`demo_offset`'s child process: train :data:`DEMO` into ``out``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train(replace(DEMO, out=out, resume=True), progress=progress)
