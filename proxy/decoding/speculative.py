"""Speculative acceptance: how long the remote's next draft should be, and whether a drafted
token is accepted or replaced so that the output follows the offset's target q exactly
(Leviathan et al. 2023, arXiv 2211.17192, Algorithm 1; Chen et al. 2023, arXiv 2302.01318)."""

from __future__ import annotations

import math

import numpy as np

from proxy.decoding.offset import apply_top_p, choose, log_softmax

#: Drafts longer than this are checked against the pair's own prediction of the
#: first position's acceptance (:meth:`proxy.decoding.token_mode.TokenDecoder._predicted_length`);
#: shorter ones would waste little remote work and are not worth the pair's extra forward pass.
PREDICT_ABOVE = 8

#: A draft computed only as read (:attr:`adapters.base.Capabilities.drafts_on_demand`) is
#: asked for at full length and scored from a first chunk of a quarter of the expected
#: accepted run (:meth:`DraftLength.expected_run`), at least this many positions, doubling
#: while accepted (:func:`on_demand_chunk`). In forget scope each position computed past the
#: first replaced token costs a remote step and a share of a pair pass for nothing; out of
#: scope the run is the whole draft, and a 96-token answer is scored in a few passes.
ON_DEMAND_FIRST_CHUNK = 4

#: While the offset's scope gate is open at the last position scored (in forget scope), an
#: on-demand draft is scored this many positions a pass, without doubling: there the
#: offset replaces about one drafted token in 14 (the demo offset, its forget questions and
#: their paraphrases, greedy), and a longer chunk computes positions past the replacement.
#: On the embedded default (6 forget-set and 6 other prompts, 96 tokens, one process, in
#: turn with the rule before, a quarter of the expected run then doubling), positions computed
#: in scope 455 against 611 for the same 406 tokens, in scope 26.1 and 29.8 tokens/s against
#: 22.7 and 22.2, out of scope 47.8 and 53.2 against 42.7 and 47.4. Not for drafts a server
#: streams: there short chunks scored beside the server on the same cores made in-scope
#: answers slower (docs/benchmarks.md).
IN_SCOPE_CHUNK = 4

#: An answer's first chunk where the pair has a scope gate that has not been read yet: small
#: enough that an in-scope answer wastes little before the gate is known, large enough that
#: an out-of-scope one needs few passes more (it doubles from here while the gate stays closed).
GATED_FIRST_CHUNK = 8


def on_demand_chunk(previous: int | None, gate_open: bool | None, *, gated: bool, expected_run: int) -> int:
    """How many positions of a draft computed as read the pair scores in its next pass.

    ``previous`` is the round's last chunk (``None``: the round's first), ``gate_open`` whether
    the scope gate was open at the last position scored (``None``: not known yet, or no gate),
    ``gated`` whether the offset has a scope gate, ``expected_run`` the acceptance rate's
    expected run (:meth:`DraftLength.expected_run`, positions). Where the gate is open,
    :data:`IN_SCOPE_CHUNK`; a round's first chunk is otherwise :data:`GATED_FIRST_CHUNK` before
    the gate is known, else a quarter of the expected run (at least :data:`ON_DEMAND_FIRST_CHUNK`);
    later chunks double. Chunk sizes change only which positions are computed, never a token
    chosen (each position is scored as it would be alone)."""
    if gate_open:
        return IN_SCOPE_CHUNK
    if previous is not None:
        return previous * 2
    if gated and gate_open is None:
        return GATED_FIRST_CHUNK
    return max(ON_DEMAND_FIRST_CHUNK, expected_run // 4)


class DraftCost:
    """What a round of speculative decoding costs as a function of its draft's length n:
    ``t(n) = a + b·n`` seconds (the remote's call and the pair's scoring of the draft),
    fitted by least squares over a served model's recent rounds, each older round's weight
    decayed by ``decay`` per newer one. :meth:`ratio` is a round's fixed cost in drafted
    tokens' worth, a / b: the one number the best draft length depends on besides the
    acceptance rate (:meth:`DraftLength.best_length`). Until the rounds seen vary enough in
    length to separate a from b, :data:`PRIOR_RATIO`."""

    #: a / b before it is measured: a round's fixed cost worth 16 drafted tokens.
    PRIOR_RATIO = 16.0
    #: Rounds (in decayed weight) before the fit replaces the prior.
    MIN_WEIGHT = 4.0

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self._w = self._n = self._t = self._nn = self._nt = 0.0
        self.rounds = 0

    def observe(self, n: int, seconds: float) -> None:
        """A round that drafted ``n`` tokens and took ``seconds``."""
        if n < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        k = self.decay
        self._w = k * self._w + 1
        self._n = k * self._n + n
        self._t = k * self._t + seconds
        self._nn = k * self._nn + n * n
        self._nt = k * self._nt + n * seconds
        self.rounds += 1

    def ratio(self) -> float:
        """a / b, at least 0: a round's fixed cost in drafted tokens' worth."""
        if self._w < self.MIN_WEIGHT:
            return self.PRIOR_RATIO
        mean_n, mean_t = self._n / self._w, self._t / self._w
        var = self._nn / self._w - mean_n**2
        if var < 1.0:  # drafts of (nearly) one length: a and b cannot be told apart
            return self.PRIOR_RATIO
        b = (self._nt / self._w - mean_n * mean_t) / var
        a = mean_t - b * mean_n
        if b <= 0:
            return math.inf  # tokens cost nothing measurable: drafts as long as allowed
        return max(0.0, a / b)


class DraftLength:
    """How many tokens to ask the remote for next (speculative acceptance).

    The per-token acceptance rate r is estimated from the positions examined
    recently, each older position's weight decayed by ``decay`` per newer one
    (a half-life of about 34 positions at 0.98), starting from ``prior`` (the
    served model's running rate) worth ``prior_weight`` positions, so that
    one early rejection does not collapse the draft length.

    With a ``cost`` (the served model's :class:`DraftCost`), the next draft is the length
    that commits the most tokens per second (:meth:`best_length`). Without one (a request
    with a seed at T > 0, whose draft lengths must not depend on timing: they decide which
    random draws go where), it asks for about twice the expected accepted run, 2 / (1 − r),
    between 2 and ``maximum`` (the maximum once r ≥ 1 − 2/maximum). Out of forget scope
    r stays near 1 and one call serves a whole answer; in scope drafts shrink to a few
    tokens so that little remote work is thrown away.
    """

    def __init__(
        self,
        maximum: int,
        prior: float = 1.0,
        *,
        prior_weight: float = 16.0,
        decay: float = 0.98,
        cost: DraftCost | None = None,
    ) -> None:
        self.maximum = maximum
        self.cost = cost
        self.decay = decay
        self._accepted = prior * prior_weight
        self._examined = prior_weight
        self.examined = 0
        self.accepted = 0

    @property
    def rate(self) -> float:
        """The estimated per-token acceptance rate r."""
        return self._accepted / self._examined

    def next(self, remaining: int) -> int:
        """The next draft's length, at most ``remaining`` (tokens)."""
        return max(1, min(self.length_for(self.rate), remaining))

    def length_for(self, rate: float) -> int:
        """The draft length for a per-token acceptance rate: :meth:`best_length` with a
        cost model, else 2 / (1 − rate) between 2 and :attr:`maximum` (the maximum once
        rate ≥ 1 − 2/maximum)."""
        if self.cost is not None:
            return self.best_length(rate, self.cost.ratio())
        if rate >= 1 - 2 / self.maximum:
            return self.maximum
        return max(2, min(self.maximum, math.ceil(2 / (1 - rate))))

    #: A round commits at least this many tokens on average where a draft can (at most 20
    #: remote calls per 100 tokens in scope), or 90% of what the longest draft would.
    MIN_COMMITTED = 5.0

    def best_length(self, rate: float, ratio: float) -> int:
        """The draft length L in [1, :attr:`maximum`] that commits the most tokens per
        second: a round with a draft of L tokens commits ``E(L) = (1 − r^L) / (1 − r)``
        tokens on average (the accepted run, and the replacement at a rejection) and costs
        ``a + b·L`` seconds, so L maximises ``E(L) / (ratio + L)`` with ``ratio`` = a / b
        (:class:`DraftCost`), among the lengths whose E(L) is at least
        min(:data:`MIN_COMMITTED`, 0.9·E(maximum)): a fixed cost worth little against a
        token's (a local remote, whose drafted tokens cost as much as its calls) would
        otherwise make a call per token or two in scope, where the objective is flat (at
        r = 0.9 and a/b = 1.5, 7 tokens instead of 4 cost 2% of the rate). A slow call to a
        fast remote gives long drafts; r = 1, the maximum."""
        if rate >= 1.0 or math.isinf(ratio):
            return self.maximum
        rate = max(rate, 0.0)
        most = (1.0 - rate**self.maximum) / (1.0 - rate)
        floor = min(self.MIN_COMMITTED, 0.9 * most)
        best, best_value, kept = self.maximum, -1.0, 1.0
        for length in range(1, self.maximum + 1):
            kept *= rate  # r^L
            committed = (1.0 - kept) / (1.0 - rate)
            if committed < floor:
                continue
            value = committed / (ratio + length)
            if value > best_value:
                best, best_value = length, value
        return best

    def expected_run(self) -> int:
        """How many positions of a draft to score first: the expected accepted run
        1 / (1 − r) plus one, at least 4 (all of the maximum once r ≥ 1 − 2/maximum)."""
        if self.rate >= 1 - 2 / self.maximum:
            return self.maximum
        return max(4, min(self.maximum, math.ceil(1 / (1 - self.rate)) + 1))

    def update(self, accepted: int, examined: int) -> None:
        """A draft of which ``accepted`` of ``examined`` positions were accepted."""
        if examined <= 0:
            return
        self.examined += examined
        self.accepted += accepted
        keep = self.decay**examined
        self._accepted = keep * self._accepted + accepted
        self._examined = keep * self._examined + examined


def speculative_pick(
    scores: np.ndarray,
    ell: np.ndarray,
    drafted: int | None,
    *,
    temperature: float,
    top_p: float,
    rng: np.random.Generator,
) -> tuple[int, np.ndarray, bool]:
    """Accept or replace the remote's drafted token at one position (docs/concepts.md,
    "Fewer remote calls"; Leviathan et al. 2023, arXiv 2211.17192, Algorithm 1;
    Chen et al. 2023, arXiv 2302.01318).

    ``scores`` are the target logits over S_t (:func:`proxy.decoding.offset.target_logits`,
    ``[k]``), ``ell`` log p_t of the same candidates (``[k]``, nats): the law
    the remote drew its draft from (its whole vocabulary's distribution at
    T = 1 with no filters, or its top-k renormalised;
    :meth:`proxy.decoding.token_mode.TokenDecoder._draft_law`) and ``drafted`` the index in S_t of the
    token the remote sampled there (``None``: outside S_t).

    T > 0: x is accepted with probability min(1, q_t(x) / p_t(x)); otherwise a
    token is drawn from (q_t − p_t)+ renormalised over S_t. The result follows
    q_t exactly, whatever p_t is. T = 0 (greedy drafts): x is accepted when it
    is the argmax of the scores, else the argmax is taken.

    Returns the chosen index, log q over S_t (what ``logprobs`` report) and
    whether the drafted token was accepted.

    Raises:
        NoUsableCandidates: every score is ``-inf``.
    """
    if temperature == 0:
        idx, logq = choose(scores, temperature=0.0, top_p=top_p, rng=rng)
        return idx, logq, drafted is not None and idx == drafted
    logq = apply_top_p(log_softmax(scores), top_p)
    q = np.exp(logq)
    if drafted is not None:
        # p_t(x) is the candidate's own logprob (the sampled entry's copy may be missing on the wire).
        ratio = math.exp(min(0.0, float(logq[drafted]) - float(ell[drafted]))) if math.isfinite(logq[drafted]) else 0.0
        if rng.random() < ratio:
            return drafted, logq, True
    with np.errstate(over="ignore", invalid="ignore"):
        residual = np.maximum(q - np.exp(np.where(np.isfinite(ell), ell, -np.inf)), 0.0)
    total = residual.sum()
    # A rejection has probability Σ(q − p)+ > 0; when rounding leaves nothing, q itself is the answer.
    weights = residual / total if total > 1e-12 else q / q.sum()
    return int(rng.choice(len(weights), p=weights)), logq, False
