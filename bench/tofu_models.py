"""The tofu-lite benchmark's black-box models, built once and cached.

    python -m bench.tofu_models [--data DIR] [--base smollm2] [--epochs 8]

* the **target**: the base model fine-tuned on every trained author
  (``full.jsonl``) until it answers them;
* the **retain model**: the same recipe on ``retain90.jsonl`` only, the gold
  standard an unlearned model should look like.

Full fine-tuning (every weight; the target must really hold the facts),
with general prompts answered by the base model mixed in (replay, against
catastrophic forgetting), AdamW, linear decay after a short warm-up, the answer tokens and the
end-of-turn labelled and the prompt masked (:func:`proxy.training.data.encode`, the
same encoding the offset is trained with). Each is saved as a transformers
folder under ``<cache>/tofu/<name>-<key>`` (the key hashes the data's bytes,
the base folder and the settings), written atomically, and served through
:class:`adapters.transformers_inprocess.TransformersInProcessAdapter`:
llama.cpp would need a GGUF converted back from these weights, and the
in-process model also gives the full-vocabulary logits that the audit's
probability metrics need.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.common.files import publish_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Trained authors in the benchmark's default tofu-lite (forget = 1 author, 10
#: items; holdout = 1 more). Fine-tuning the 135M target on 2 CPU cores costs
#: about 10 s per step of 8 answers, so 10 authors keep it to minutes.
DEFAULT_AUTHORS = 10


@dataclass(frozen=True)
class FinetuneSettings:
    base: str = "smollm2"
    epochs: int = 6
    lr: float = 1.5e-4
    replay_per_epoch: int = 32
    """General prompts answered by the base model itself (``proxy/resources/general_answers.jsonl``)
    mixed into each epoch: measured here, fine-tuning on the authors alone made the
    target answer "The capital of France is Tbilisi" (world-facts ROUGE 0.17)."""
    batch_size: int = 8
    warmup_fraction: float = 0.05
    max_length: int = 128
    seed: int = 0


#: Chat templates for bases whose tokenizer has none (Gemma 3 270M is a base model):
#: the target is fine-tuned, saved and served with it.
_TEMPLATES = {"gemma3-270m": "gemma"}


def _key(data: Path, s: FinetuneSettings) -> str:
    """What a fine-tuned model depends on: the settings, the question/answer
    pairs it is trained on (not the evaluation-only fields of the file), the
    replay set and the base model."""
    from proxy.pair.model_files import local_model_dir
    from proxy.training.data import load_dataset
    from proxy.training.demo import GENERAL_ANSWERS

    h = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode())
    for e in load_dataset(data).examples:
        h.update(json.dumps([e.prompt, e.target]).encode())
    h.update(GENERAL_ANSWERS.read_bytes())
    h.update(local_model_dir(s.base).name.encode())
    return h.hexdigest()[:16]


def _answer_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Mean NLL of the labelled tokens, with the LM head applied at those
    positions only (the prompt's logits are never needed; about 15% less
    compute than ``model(**batch).loss`` on these short answers)."""
    import torch

    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # type: ignore[attr-defined]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = model.lm_head(hidden[:, :-1][keep])  # type: ignore[attr-defined]
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def finetune(data: Path, out: Path, s: FinetuneSettings, *, progress: bool = True) -> Path:
    """Fine-tune ``s.base`` on the QA pairs in ``data`` and save it to ``out`` (atomically).

    Returns ``out``; writes ``out/finetune_log.jsonl`` (mean loss per epoch)
    and ``out/finetune.json`` (settings, data sha256, seconds).
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    from proxy.decoding.vocab import ByteVocab
    from proxy.pair.model_files import local_model_dir
    from proxy.training.data import collate, encode, load_dataset
    from proxy.training.demo import GENERAL_ANSWERS

    torch.manual_seed(s.seed)
    rng = random.Random(s.seed)
    folder = local_model_dir(s.base)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template is None and s.base in _TEMPLATES:
        from adapters.templates import BUILTIN

        tokenizer.chat_template = BUILTIN[_TEMPLATES[s.base]]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    eot = ByteVocab.from_tokenizer(tokenizer).eot_ids[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    dataset = load_dataset(data)
    items = [encode(e, tokenizer, eot, s.max_length) for e in dataset.examples]
    replay = [encode(e, tokenizer, eot, s.max_length) for e in load_dataset(GENERAL_ANSWERS).examples]
    n_replay = min(s.replay_per_epoch, len(replay))
    steps_per_epoch = (len(items) + n_replay + s.batch_size - 1) // s.batch_size
    total = steps_per_epoch * s.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    sched = get_scheduler(
        "linear", opt, num_warmup_steps=max(1, int(total * s.warmup_fraction)), num_training_steps=total
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    t0 = time.monotonic()
    try:
        logs = []
        bar = tqdm(total=total, desc=f"fine-tune {out.name}", unit="step", disable=not progress)
        for epoch in range(s.epochs):
            pool = items + rng.sample(replay, n_replay)
            order = list(range(len(pool)))
            rng.shuffle(order)
            losses = []
            for i in range(0, len(order), s.batch_size):
                batch = collate([pool[j] for j in order[i : i + s.batch_size]], pad)
                loss = _answer_loss(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            logs.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses)})
            log.info("epoch %d: loss %.4f", epoch + 1, logs[-1]["loss"])
        bar.close()
        model.eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "finetune_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in logs))
        meta = {"settings": asdict(s), "data": dataset.describe(), "seconds": round(time.monotonic() - t0, 1)}
        (tmp / "finetune.json").write_text(json.dumps(meta, indent=2) + "\n")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cached_model(data: Path, name: str, s: FinetuneSettings = FinetuneSettings(), *, progress: bool = True) -> Path:
    """``<cache>/tofu/<name>-<key>``, fine-tuned on first use (file lock against concurrent builders)."""
    from filelock import FileLock

    from proxy.common.files import cache_dir

    out = cache_dir() / "tofu" / f"{name}-{_key(data, s)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            finetune(data, out, s, progress=progress)
    return out


def build(data_dir: Path, s: FinetuneSettings = FinetuneSettings(), *, progress: bool = True) -> dict[str, Path]:
    """The target (``full.jsonl``) and the retain model (``retain90.jsonl``) for a tofu-lite folder."""
    return {
        "target": cached_model(data_dir / "full.jsonl", "target", s, progress=progress),
        "retain": cached_model(data_dir / "retain90.jsonl", "retain", s, progress=progress),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tofu_models", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a tofu-lite folder (default: generated with the default seed, cached)")
    p.add_argument("--base", default=FinetuneSettings.base)
    p.add_argument("--epochs", type=int, default=FinetuneSettings.epochs)
    p.add_argument("--lr", type=float, default=FinetuneSettings.lr)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = a.data or default_data()
    for k, v in build(data, FinetuneSettings(base=a.base, epochs=a.epochs, lr=a.lr)).items():
        print(f"{k}: {v}")


def default_data() -> Path:
    """tofu-lite with seed 0 and :data:`DEFAULT_AUTHORS`, generated once under ``<cache>/tofu/``."""
    from filelock import FileLock

    from proxy.common.files import cache_dir

    from .tofu_lite import GENERATOR_VERSION, write

    out = cache_dir() / "tofu" / f"data-v{GENERATOR_VERSION}-seed0-{DEFAULT_AUTHORS}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").is_file():
            write(out, DEFAULT_AUTHORS, 0)
    return out


if __name__ == "__main__":
    main()
