"""Redaction on tofu-lite (issue 7): the target's own answers to forget and
retain questions, scored with the δ-unlearning offset of ``bench.tofu``.

    python -m bench.tofu_redact --audit DIR [--objective NPO+KL] [--offset-settings JSON]
                                [--fpr 0.05] [--json FILE]

``DIR`` is the target row's audit folder of ``python -m bench.tofu --keep``
(its ``items.jsonl`` holds the target's greedy answers). The threshold T is
calibrated (:func:`proxy.redaction.spans.calibrate`) on the retain answers for the
target false-positive rate (flagged characters of retain answers, less those
that repeat a forget item's key span the retain item's own answer does not hold:
:func:`forget_content`), then applied to the forget answers: the greedy ones and
the audit's samples at T = 1 (``samples``, 5 per item with ``bench.tofu
--samples 5``). Recall: of the forget answers whose key span the target did
write, the fraction whose key span lies wholly inside the flagged (masked) text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def span_recall(text: str, spans: list[dict[str, Any]], key_spans: list[str]) -> bool | None:
    """Whether every occurrence of a key span in ``text`` is inside a flagged
    span; ``None`` when no key span occurs (nothing to redact)."""
    from proxy.evaluation.metrics import span_pattern

    hits = [m for k in key_spans for m in span_pattern(k).finditer(text)]
    if not hits:
        return None
    return all(any(s["start"] <= m.start() and m.end() <= s["end"] for s in spans) for m in hits)


def forget_content(text: str, reference: str, forget_keys: list[str]) -> list[tuple[int, int]]:
    """Character ranges of ``text`` (a retain answer the target wrote) that repeat a forget
    item's key span which the retain item's own reference answer does not hold: forget-set
    content the target put in a retain answer (it gives one author's book to another), so
    flagging it is no false positive. A key span the retain author shares (the same award,
    the same number) stays counted."""
    from proxy.evaluation.metrics import span_pattern

    patterns = [span_pattern(k) for k in forget_keys]
    return [(m.start(), m.end()) for p in patterns if not p.search(reference) for m in p.finditer(text)]


def measure(
    audit_dir: Path,
    objective: str,
    fpr: float,
    offset_settings: dict[str, Any] | None = None,
    *,
    phrases: bool = True,
) -> dict[str, Any]:
    from bench.tofu import OFFSET_SETTINGS, _cached_offset, row_offset_settings
    from bench.tofu_models import default_data
    from proxy.common.literals import ObjectiveName, choice
    from proxy.pair.local import LocalPair
    from proxy.redaction.scoring import Item, score
    from proxy.redaction.spans import calibrate, flag_spans, flagged_fraction
    from proxy.training.config import TrainConfig

    settings = row_offset_settings(objective, OFFSET_SETTINGS if offset_settings is None else offset_settings)
    data = default_data()
    rows = [json.loads(line) for line in (audit_dir / "items.jsonl").read_text().splitlines() if line.strip()]
    questions = {}
    for split, name in (("forget", "forget10"), ("retain", "retain_perturbed")):
        for i, line in enumerate((data / f"{name}.jsonl").read_text().splitlines()):
            questions[(split, i)] = json.loads(line)
    cfg = TrainConfig(
        forget=str(data / "forget10.jsonl"),
        retain=str(data / "retain90.jsonl"),
        out="",
        objective=choice(ObjectiveName, objective, "objective"),
        base="smollm2",
        **settings,
    )
    offset, _ = _cached_offset(f"delta:{objective}", cfg)
    pair = LocalPair.load("smollm2", offset)

    def scored(split: str, text: str = "generation") -> list[tuple[dict[str, Any], Any]]:
        """``(row, Scored)`` for the target's greedy answers, or (``text="samples"``) for
        each of its sampled answers at T = 1 (the row's ``generation`` replaced)."""
        out = []
        for r in rows:
            if r["split"] != split:
                continue
            answers = [r.get("generation")] if text == "generation" else r.get("samples") or []
            for a in answers:
                if a:
                    item = Item(0, f"{split}:{r['index']}", a, messages=[{"role": "user", "content": r["question"]}])
                    out.append(({**r, "generation": a}, score(pair, item)))
        return out

    retain, forget, sampled = scored("retain"), scored("forget"), scored("forget", "samples")
    forget_keys = sorted({k for (split, _), q in questions.items() if split == "forget" for k in q["key_spans"]})
    leaked = [
        forget_content(r["generation"], questions[("retain", r["index"])]["answer"], forget_keys) for r, _ in retain
    ]
    t, got_fpr = calibrate([r["generation"] for r, _ in retain], [s for _, s in retain], fpr, leaked, phrases=phrases)

    def recall(outputs: list[tuple[dict[str, Any], Any]]) -> list[bool]:
        hits = []
        for r, s in outputs:
            spans = flag_spans(r["generation"], s, t, phrases=phrases)
            ok = span_recall(r["generation"], spans, questions[("forget", r["index"])]["key_spans"])
            if ok is not None:
                hits.append(ok)
        return hits

    hits, hits_sampled = recall(forget), recall(sampled)
    return {
        "objective": objective,
        "offset": offset.name,
        "offset_settings": settings,
        "phrases": phrases,
        "threshold": round(t, 4),
        "retain_flagged_fraction": round(got_fpr, 5),
        "retain_outputs": len(retain),
        "retain_outputs_with_forget_content": sum(bool(x) for x in leaked),
        "forget_outputs": len(forget),
        "forget_outputs_with_key_span": len(hits),
        "key_span_recall": round(sum(hits) / len(hits), 4) if hits else None,
        "forget_samples": len(sampled),
        "forget_samples_with_key_span": len(hits_sampled),
        "key_span_recall_sampled": round(sum(hits_sampled) / len(hits_sampled), 4) if hits_sampled else None,
        "forget_flagged_fraction": round(
            flagged_fraction([r["generation"] for r, _ in forget], [s for _, s in forget], t, phrases=phrases), 4
        ),
    }


def main(argv: list[str] | None = None) -> None:
    from bench.tofu import offset_settings_arg

    p = argparse.ArgumentParser(prog="python -m bench.tofu_redact", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--audit", type=Path, required=True, help="the target row's audit folder (bench.tofu --keep DIR: DIR/target)"
    )
    p.add_argument("--objective", default="NPO+KL")
    p.add_argument("--offset-settings", type=offset_settings_arg, default=None, metavar="JSON", help="as bench.tofu's")
    p.add_argument("--fpr", type=float, default=0.05)
    p.add_argument(
        "--no-phrases",
        dest="phrases",
        action="store_false",
        help="widen flagged tokens to whole words only, not to the name or title they fall in",
    )
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if not (a.audit / "items.jsonl").is_file():
        p.error(f"{a.audit / 'items.jsonl'} does not exist: give the target row's folder of bench.tofu --keep DIR")
    result = measure(a.audit, a.objective, a.fpr, a.offset_settings, phrases=a.phrases)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
