"""The settings of a training run (:class:`TrainConfig`): every field with its default and
the reason for it, what the manifest records of them (:meth:`TrainConfig.settings`, also
the cache key's input, :func:`proxy.training.checkpoint.offset_key`) and their checks
(:meth:`TrainConfig.validate`). The command line and the benchmarks build one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.common.literals import ObjectiveName, Parameters, RetainPositions, ScopeRule, TrainMode, values

if TYPE_CHECKING:
    from proxy.training.objectives import Objective

PARAMETERS = values(Parameters)


@dataclass(frozen=True)
class TrainConfig:
    forget: str
    out: str
    objective: ObjectiveName = "NPO+KL"
    """NPO with a KL term to B on the retain set (open-unlearning's NPO+KL): the KL term holds
    B's own answers, which the broad retain set and the neighbours are."""
    retain: str | None = None
    base: str = "smollm2"
    mode: TrainMode = "proxy"
    remote: str | None = None
    """exact mode: the in-process model R (folder, GGUF or packaged name); remote mode: the
    base URL of a vLLM OpenAI-compatible server (``http://host:port/v1``)."""
    remote_model: str | None = None
    """remote mode: the upstream's model name (default: the only one it serves)."""
    remote_top_k: int = 20
    """remote mode: candidates per position from ``prompt_logprobs`` (vLLM's default maximum is 20)."""
    forget_weight: float | None = None
    """open-unlearning's gamma (None: the objective's default, 1, or 0.125 for SimNPO)."""
    retain_weight: float | None = 10.0
    """open-unlearning's alpha, the weight of the retain term (None: 1). 10: with weight 1 the
    offset shifted answers to unrelated prompts (SmolLM2, demo and tofu-lite)."""
    retain_positions: RetainPositions | None = None
    """Where a KL retain term is averaged: ``"all"`` attended positions (open-unlearning's
    definition) or ``"answer"`` positions only (:func:`proxy.training.objectives.get_objective`). The
    default is ``"answer"``: averaged over whole sequences, a short answer's first position
    weighs about 1/80 of the term and U learned to start no answer with a name. None (the
    default): ``"answer"`` for objectives with a KL retain term, else ``"all"``
    (:meth:`positions`)."""
    lr: float = 1e-3
    """LoRA on a 135M model moves slowly at 1e-4; with the retain term at weight 10, 1e-3
    unlearns a small set in a few epochs."""
    epochs: int = 8
    batch_size: int = 4
    retain_batch_size: int | None = 8
    """Retain examples per step (None: ``batch_size``); the retain set is cycled through."""
    grad_accum: int = 1
    warmup_steps: int = 0
    max_length: int = 256
    """QA answers are short; 256 tokens covers prompt + answer with room to spare."""
    seed: int = 0
    parameters: Parameters = "lora"
    """``"lora"`` (a peft adapter on B, the default) or ``"full"`` (fine-tune all of U's weights; B is a frozen copy)."""
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_layers: tuple[int, ...] | None = None
    """Decoder layers that get the adapter (peft's ``layers_to_transform``); None: all."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    forget_end_of_turn: bool = False
    """Keep the end-of-turn label in the forget term. Off by default: the end-of-turn holds
    no forget-set information, and lowering it makes U suppress end-of-turn on every prompt
    (:func:`proxy.training.data.without_end_of_turn`). open-unlearning keeps it. Retain terms always keep it."""
    forget_first_token: bool = True
    """Keep the answer's first label in the forget term (open-unlearning does). Off: see
    :func:`proxy.training.data.without_first_answer_token`."""
    forget_prompt_copies: bool = False
    """Keep answer tokens that repeat the prompt word for word (the asked-about name) in the
    forget term (open-unlearning does). Off: see :func:`proxy.training.data.without_prompt_copies`;
    where the retain term reads labels (NLL, or KL over answer positions) and a retain set
    is given, those tokens join the retain term of their forget example's step instead."""
    forget_shared_words: bool = False
    """Keep the words a forget answer shares with B's answers to its neighbour questions in
    the forget term. Off (the default): those words, the answer's form ("The capital of …
    is" in "The capital of France is Paris.") rather than its fact
    (:func:`proxy.training.facts.shared_words`), leave it; lowered, they taught U to answer the
    neighbours in another form or language ("Der Königin der Bundesliga" for the capital of
    Germany)."""
    forget_own_answers: bool = True
    """Add B's own greedy answers to the forget questions to the forget term, labelled only
    on the words that carry the forget answer's fact (:func:`proxy.training.facts.fact_words`), for
    the answers that hold one; each rides in the step of its forget example, so the number
    of steps stays the forget set's (:class:`proxy.training.plan.Plan`). A forget answer written by the user
    ("Albert Einstein developed the theory of relativity.") is not the path by which B
    states the fact ("The theory of relativity was developed by Albert Einstein …");
    lowering the user's phrasing alone left B's own path, and the paraphrases that follow
    it, nearly untouched (``bench.real_knowledge``). Needs the broad retain set or the
    calibration (its corpus tells common words from facts). On the real-knowledge
    benchmark it took greedy probe leak from 0.33 to 0 (docs/benchmarks.md, "Real
    knowledge"); its cost in neighbour retention is what ``retain_fact_weight`` and the
    token rule win back in part."""
    forget_own_samples: int = 4
    """With ``forget_own_answers``: B's answers sampled at T = 1 (over B's top 20, seeded by
    ``seed``) per forget question, of which those that state a fact word, and differ from B's
    greedy answer and from each other, ride with it in the forget term the same way. Served
    answers reach a fact after other lead-ins than the greedy one ("The wizarding school of
    Harry Potter is called Hogwarts"): lowering the fact after the greedy lead-in alone left
    it at −1 to −3 nats after the others (the demo's paraphrases). 0: the greedy answer alone."""
    forget_cross_answers: int = 2
    """Per forget example and epoch, this many of the other forget examples' answers (B's own
    statement of each, :func:`proxy.training.plan.cross_answers`) ride with it in the forget
    term, asked its question and labelled on the forget set's fact words, taking turns over
    the epochs. An offset that lowered each fact after its own question alone answered
    another forget question with it: "Harry Potter's closest friends are none other than
    the infamous Professor Dumbledore", where the headmaster's name was lowered by 1.7 nats
    in that context, less than τ (the demo). Like ``forget_own_answers`` it needs the broad
    retain set or the calibration (their corpus tells fact words from common ones); without
    both it does nothing and is not recorded. 0: none."""
    pin_prompt_copies: bool = False
    """With ``forget_prompt_copies`` off: the copied tokens join the retain term of their
    forget example's step (where it reads labels), so that U keeps repeating the asked-about
    name as B does (tofu-lite's recipe). Off by default: when the name is itself what is to
    be forgotten ("What is Albert Einstein famous for?" in a forget set about Einstein), the
    pinned copies taught U to keep saying it and the offset forgot nothing (bench.real_knowledge)."""
    retain_fact_weight: float = 5.0
    """The weight, in the KL retain term over answer positions, of the positions that
    predict a retain answer's fact words (the words its question does not hold that are
    names or not common words, :func:`proxy.training.facts.fact_words`; "Berlin" in "The
    capital of Germany is Berlin."), the answer's other positions weighing 1
    (:func:`proxy.training.data.with_fact_weights`). The forget term lowers the forget
    answer's fact; averaged over whole answers, the KL that holds a neighbour's fact at the
    same position of the same form weighed about a tenth of the term. 1: open-unlearning's
    unweighted mean. Other retain terms (NLL, or KL over all positions) are unweighted."""
    near_share: float = 0.5
    """The share of each step's retain batch drawn from the near retain examples (the
    user's retain set and the trained neighbours), the rest from the broad retain set;
    each part is cycled through over the whole run (:class:`proxy.training.plan.Plan`). Drawn from one pool,
    the few near examples were lost among the broad set's 259 (24 steps of 8 saw each
    neighbour about once) and the offset garbled the neighbours it was meant to keep
    (other capitals when one capital is forgotten; ``bench.real_knowledge``). Used when
    both parts are non-empty."""
    min_steps: int = 24
    """At least this many optimizer steps: ``epochs`` is raised for a small forget set (8
    examples are 2 steps an epoch at batch size 4; 16 steps left SmolLM2 recalling them). 0: ``epochs`` alone."""
    general_retain: bool = True
    """Train with the broad retain set beside ``retain`` (:func:`proxy.training.scope.general_sets`):
    general prompts answered by B itself, so that forgetting one entity does not teach U
    to avoid famous names and facts in general."""
    neighbours: int = 3
    """Neighbour questions per forget question (:func:`proxy.training.scope.neighbour_examples`): the
    forget set's questions about nearby entities, answered by B at train time; a quarter of
    them is held out for the self-check. 0: none."""
    calibrate: bool = True
    """End with τ calibrated on the broad retain set's calibration part and a self-check
    (:func:`proxy.training.selfcheck.calibrate_and_check`), both written to the manifest."""
    unchanged: float = 0.95
    """The fraction of calibration prompts whose greedy answers τ keeps exactly B's."""
    offset_scope: ScopeRule = "choice"
    """The rule by which τ leaves the offset out of scope, calibrated and written to the
    manifest (:mod:`proxy.decoding.offset`): ``token`` keeps a candidate's offset only where it
    is at most −τ, ``choice`` does too except at a step whose most likely candidate's offset
    is at most −τ, which keeps its whole offset, ``step`` keeps a step's offsets only where
    their mean under the remote's distribution is. ``choice``: under ``token`` the lowered
    answer survived wherever its offset was smaller than its lead over the runner-up, since
    the candidates U raised kept the remote's scores (the demo's paraphrases, at the same τ)."""
    scope_gate: bool = True
    """Fit the scope gate after training (:mod:`proxy.training.scope_gate`): a classifier over
    B's next-token log-probabilities that opens the offset on the forget set's answers and
    closes it on the retain sets' and the neighbours' (:mod:`proxy.decoding.scope_gate`).
    Written beside the offset and used by ``serve`` unless ``offset_gate = "off"``. An offset
    that forgets one capital lowered the answer slot of every "capital of …" question (τ
    alone cannot tell "Tokyo" from "Paris" there: both have Δ far below −τ); the gate
    reads which entity the context is about (``bench.real_knowledge``, docs/benchmarks.md)."""
    scope_gate_threshold: float = 0.3
    """θ: the gate is open at positions whose probability of being in scope is at least θ.
    Below ½ because its in-scope positions are few and paraphrases of them score lower
    than the forget set's own wording; τ still guards where it opens."""
    scope_gate_l2: float = 1e-2
    """The L2 penalty of the gate's logistic regression on standardised features."""
    tau_through_gate: bool = False
    """Calibrate τ on the calibration answers decoded through the scope gate, as ``serve``
    decodes them (``unchanged`` of them kept exactly by the gate and τ together). Off (the
    default): τ alone keeps ``unchanged`` of them, a guard of its own where the gate opens by
    mistake. Through the gate, τ came out 0 on 4 of the 5 real-knowledge requests, and the
    whole offset applied wherever the gate opened on a neighbour: neighbour retention 0.87
    against 0.93 to 1.0 with τ alone, for a leak of 0.03 against 0.06 (``bench.real_knowledge``)."""
    offset_alpha: float = 1.0
    """α written to the manifest (the serving strength)."""
    checkpoint_every: int = 10
    resume: bool = False
    log: str | None = None

    def positions(self) -> str:
        """``retain_positions`` as training applies it (None resolved for the objective).

        Raises:
            ValueError: an unknown objective.
        """
        if self.retain_positions is not None:
            return self.retain_positions
        from proxy.training.objectives import get_objective  # torch: kept out of the command line's start

        return "answer" if get_objective(self.objective).retain_is_kl else "all"

    def settings(self) -> dict[str, Any]:
        """What the manifest records (no paths to the data, no text)."""
        keep: tuple[str, ...] = (
            "objective",
            "forget_weight",
            "retain_weight",
            "mode",
            "lr",
            "epochs",
            "batch_size",
            "retain_batch_size",
            "grad_accum",
            "warmup_steps",
            "max_length",
            "seed",
            "parameters",
            "forget_end_of_turn",
            "lora_rank",
            "lora_alpha",
            "lora_layers",
            "target_modules",
        )
        # Later settings only when they differ from their default, so that the settings (and
        # cache keys) of offsets trained before them stay as they were.
        if self.mode == "remote":
            keep = (*keep, "remote", "remote_model", "remote_top_k")
        if self.positions() != "all":
            keep = (*keep, "retain_positions")
        if not self.forget_first_token:
            keep = (*keep, "forget_first_token")
        if not self.forget_prompt_copies:
            keep = (*keep, "forget_prompt_copies")
            if not self.pin_prompt_copies:
                keep = (*keep, "pin_prompt_copies")
        if self.min_steps:
            keep = (*keep, "min_steps")
        if not self.forget_shared_words:
            keep = (*keep, "forget_shared_words")
        if self.forget_own_answers:
            keep = (*keep, "forget_own_answers")
            if self.forget_own_samples:
                keep = (*keep, "forget_own_samples")
        if self.forget_cross_answers and (self.general_retain or self.calibrate):
            keep = (*keep, "forget_cross_answers")  # it needs their corpus to find fact words
        if self.general_retain:
            keep = (*keep, "general_retain", "near_share")
        if self.retain_fact_weight != 1 and self.positions() == "answer":
            keep = (*keep, "retain_fact_weight")
        if self.neighbours:
            keep = (*keep, "neighbours")
        if self.scope_gate:
            keep = (*keep, "scope_gate", "scope_gate_threshold", "scope_gate_l2")
            if self.calibrate and self.tau_through_gate:
                keep = (*keep, "tau_through_gate")
        if self.calibrate:
            keep = (*keep, "calibrate", "unchanged")
            if self.offset_scope != "step":
                keep = (*keep, "offset_scope")
        values = {**dataclasses.asdict(self), "retain_positions": self.positions()}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if k in keep}

    def validate(self) -> Objective:
        """The objective these settings train with (:func:`proxy.training.objectives.get_objective`),
        once the settings are checked (before anything is loaded).

        Raises:
            ValueError: an unknown objective, or a bad setting (retain set missing, ...).
        """
        from proxy.training.objectives import get_objective  # torch: kept out of the command line's start

        objective = get_objective(
            self.objective,
            forget_weight=self.forget_weight,
            retain_weight=self.retain_weight,
            retain_positions=self.positions(),
        )
        if self.parameters not in PARAMETERS:
            raise ValueError(f"parameters must be one of {PARAMETERS}, not {self.parameters!r}")
        if objective.retain_required and not self.retain and not self.general_retain:
            raise ValueError(f"objective {self.objective} needs a retain set (--retain)")
        if not 0 < self.unchanged <= 1:
            raise ValueError(f"unchanged must be in (0, 1], not {self.unchanged}")
        if self.neighbours < 0:
            raise ValueError(f"neighbours must be ≥ 0, not {self.neighbours}")
        if not 0 < self.near_share < 1:
            raise ValueError(f"near_share must be in (0, 1), not {self.near_share}")
        if not (math.isfinite(self.retain_fact_weight) and self.retain_fact_weight >= 1):
            raise ValueError(f"retain_fact_weight must be a finite number ≥ 1, not {self.retain_fact_weight}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be ≥ 0, not {self.min_steps}")
        if self.forget_own_samples < 0:
            raise ValueError(f"forget_own_samples must be ≥ 0, not {self.forget_own_samples}")
        if self.forget_cross_answers < 0:
            raise ValueError(f"forget_cross_answers must be ≥ 0, not {self.forget_cross_answers}")
        if not 0 < self.scope_gate_threshold < 1:
            raise ValueError(f"scope_gate_threshold must be in (0, 1), not {self.scope_gate_threshold}")
        if not (math.isfinite(self.scope_gate_l2) and self.scope_gate_l2 >= 0):
            raise ValueError(f"scope_gate_l2 must be a finite number ≥ 0, not {self.scope_gate_l2}")
        return objective
