"""Judge-free metrics for the results of normal vs parallel decoding.

- speed, as the reference defines it: per row ``length / time`` tokens/s for each mode, then means;
- throughput of a batched run (generate.py --batch_size N > 1): generated tokens over the wall time of each mode's
  batch passes;
- final-answer extraction: the text after the LAST ``Final answer:`` (or ``最终答案：``), else the last non-empty line;
- retrieval exact match against ``gold_keys`` (the student's name);
- multi-document QA exact match and token F1 against ``answers`` with SQuAD-style normalization
  (lowercase, strip punctuation and the articles a/an/the, collapse whitespace).

Everything here is pure Python on plain row dicts so it can be unit-tested without a model or a network.
"""

import collections
import math
import re
import string
import unicodedata

from ..runs.throughput import batch_passes, throughput

MODES = ("normal", "parallel")
SCORE_MIN, SCORE_MAX = 1, 5  # the judge's scale

# ---------------------------------------------------------------------------------------------------------------------
# Text helpers

# CJK Unified Ideographs (+ extension A), CJK symbols and punctuation, full-width forms.
_CJK_RE = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")
_CJK_CHAR_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


def has_cjk(text):
    """True if ``text`` contains Chinese characters (used to pick the Chinese judge prompt)."""
    return bool(text) and _CJK_RE.search(text) is not None


# The marker the task instructions ask for; colon may be ASCII or full-width, the marker may be wrapped in markdown
# bold (``**Final answer:**``). English matching is case-insensitive.
_FINAL_ANSWER_RE = re.compile(r"(?:final\s+answer|最终答案)\s*[:：]", re.IGNORECASE)
# Decoration that models put around an answer and that is not part of it.
_DECORATION = " \t*`_\"'“”‘’「」"


def _strip_decoration(text):
    return text.strip().strip(_DECORATION).strip()


def extract_final_answer(response):
    """The answer a response finally gives.

    The text after the LAST ``Final answer:`` / ``最终答案：`` marker up to the end of that line (if the marker ends
    its line, the next non-empty line); without a marker, the last non-empty line. Markdown emphasis, backticks and
    quotes around the answer are dropped. Returns "" for an empty or missing response.
    """
    if not response:
        return ""
    matches = list(_FINAL_ANSWER_RE.finditer(response))
    if matches:
        rest = response[matches[-1].end() :]
        for line in rest.splitlines():
            line = _strip_decoration(line)
            if line:
                return line
        return ""
    for line in reversed(response.splitlines()):
        line = _strip_decoration(line)
        if line:
            return line
    return ""


def _is_punctuation(ch):
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text):
    """SQuAD normalization: lowercase, drop punctuation (ASCII and Unicode), drop a/an/the, collapse whitespace."""
    text = str(text).lower()
    text = "".join(" " if _is_punctuation(ch) else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_tokens(text):
    """Tokens of a normalized answer: whitespace words, with each Chinese character its own token."""
    text = _CJK_CHAR_RE.sub(lambda m: f" {m.group(0)} ", normalize_answer(text))
    return text.split()


def exact_match(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction, gold):
    pred_tokens, gold_tokens = answer_tokens(prediction), answer_tokens(gold)
    if not pred_tokens or not gold_tokens:
        # Both empty counts as agreement; one empty is a miss.
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def as_answer_list(value):
    """Gold answers as a list of strings (datasets store a string, a list, or a JSON-ish scalar)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None and str(v).strip()]
    return [str(value)] if str(value).strip() else []


# Separators between names when a retrieval answer lists several keys.
_LIST_SEPARATOR_RE = re.compile(r"\s*(?:[,;，；、]|\band\b|和)\s*")


def retrieval_exact_match(response, gold_keys):
    """1.0 if the final answer names exactly the gold key(s), else 0.0.

    One gold key: the normalized final answer equals the normalized key. Several gold keys: the final answer, split on
    commas/semicolons/"and", is the same set of normalized names.
    """
    gold = as_answer_list(gold_keys)
    if not gold:
        raise ValueError("retrieval row has no gold_keys")
    final = extract_final_answer(response)
    if len(gold) == 1:
        return exact_match(final, gold[0])
    predicted = {normalize_answer(part) for part in _LIST_SEPARATOR_RE.split(final)} - {""}
    return float(predicted == {normalize_answer(g) for g in gold})


def qa_scores(response, answers):
    """(exact match, token F1) of the final answer, each the max over the gold answers."""
    gold = as_answer_list(answers)
    if not gold:
        raise ValueError("multi-document-qa row has no answers")
    final = extract_final_answer(response)
    return max(exact_match(final, g) for g in gold), max(token_f1(final, g) for g in gold)


# ---------------------------------------------------------------------------------------------------------------------
# Row helpers


def is_blank(value):
    """None, NaN, and empty/whitespace strings all mean "nothing here" (the error/fallback columns use all three)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return False


def as_number(value):
    """A finite float, or None for missing/NaN/non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def row_speed(row, mode):
    """Tokens/s of one mode in one row (``length / time``), or None if the row has no usable time/length."""
    time_s, length = as_number(row.get(f"{mode}_time")), as_number(row.get(f"{mode}_length"))
    if time_s is None or length is None or time_s <= 0:
        return None
    return length / time_s


def row_tokens_per_step(row, mode):
    """Generated tokens per forward pass of one mode in one row (``length / steps``), or None without step counts."""
    steps, length = as_number(row.get(f"{mode}_steps")), as_number(row.get(f"{mode}_length"))
    if steps is None or length is None or steps <= 0:
        return None
    return length / steps


def row_speedup(row):
    """Parallel tokens/s over normal tokens/s in one row, or None."""
    normal, parallel = row_speed(row, "normal"), row_speed(row, "parallel")
    return parallel / normal if normal and parallel is not None else None


def row_step_ratio(row):
    """Parallel tokens per forward pass over normal tokens per forward pass: the speedup if a pass cost the same."""
    normal, parallel = row_tokens_per_step(row, "normal"), row_tokens_per_step(row, "parallel")
    return parallel / normal if normal and parallel is not None else None


def row_capped(row, mode):
    """Whether ``mode`` hit a cap in this row (``<mode>_caps`` non-empty: e.g. the answer reached max_new_tokens);
    None when the row does not record it (files of earlier versions and of the reference)."""
    caps = row.get(f"{mode}_caps")
    return bool(caps) if isinstance(caps, list) else None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(numerator, denominator):
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    return numerator / denominator if denominator and numerator is not None else None


# ---------------------------------------------------------------------------------------------------------------------
# Summaries


def speed_summary(rows):
    """Speed statistics over the rows, as the reference computes them.

    Rows with a non-empty ``error`` are excluded from every mean (their time is not a generation time). Of the rest,
    only rows where every mode present in the file has a positive time and a length are used, so both modes are
    averaged over the same rows (``speed_rows``).

    - ``<mode>_time``: mean wall time (s); ``<mode>_length``: mean generated tokens;
    - ``<mode>_speed``: mean of per-row ``length / time`` (tokens/s);
    - ``speedup``: mean parallel tokens/s / mean normal tokens/s;
    - ``time_ratio``: mean of per-row ``normal_time / parallel_time``;
    - ``<mode>_capped``: rows where that mode hit a cap; ``capped_rows``: rows where either did;
      ``uncapped_rows`` and ``uncapped_speedup``: the rows where neither did (both modes then stopped on their own,
      so they did comparable work) and the speedup over them. All None when the file records no caps.
    - ``<mode>_steps``: mean forward passes per row (prefills included), ``<mode>_tokens_per_step`` the mean of
      per-row ``length / steps``, and ``step_ratio`` = mean parallel / mean normal tokens per step, the speedup's
      hardware-independent bound (over the usable rows that have step counts; None for files without them).
    """
    modes = [m for m in MODES if any(not is_blank(r.get(f"{m}_time")) for r in rows)]
    error_rows = [r for r in rows if not is_blank(r.get("error"))]
    fallback_rows = [r for r in rows if not is_blank(r.get("fallback"))]
    usable = [r for r in rows if is_blank(r.get("error")) and modes and all(row_speed(r, m) is not None for m in modes)]
    summary = {
        "rows": len(rows),
        "speed_rows": len(usable),
        "error_rows": len(error_rows),
        "fallback_rows": len(fallback_rows),
    }
    for mode in MODES:
        present = mode in modes and bool(usable)
        summary[f"{mode}_time"] = _mean(as_number(r[f"{mode}_time"]) for r in usable) if present else None
        summary[f"{mode}_length"] = _mean(as_number(r[f"{mode}_length"]) for r in usable) if present else None
        summary[f"{mode}_speed"] = _mean(row_speed(r, mode) for r in usable) if present else None
    summary["speedup"] = _ratio(summary["parallel_speed"], summary["normal_speed"])
    stepped = [r for r in usable if all(row_tokens_per_step(r, m) is not None for m in modes)]
    for mode in MODES:
        present = mode in modes and bool(stepped)
        summary[f"{mode}_steps"] = _mean(as_number(r[f"{mode}_steps"]) for r in stepped) if present else None
        summary[f"{mode}_tokens_per_step"] = _mean(row_tokens_per_step(r, mode) for r in stepped) if present else None
    summary["step_ratio"] = _ratio(summary["parallel_tokens_per_step"], summary["normal_tokens_per_step"])
    if "normal" in modes and "parallel" in modes and usable:
        summary["time_ratio"] = _mean(as_number(r["normal_time"]) / as_number(r["parallel_time"]) for r in usable)
    else:
        summary["time_ratio"] = None
    summary.update(_cap_summary(usable, modes))
    return summary


def _cap_summary(usable, modes):
    recorded = any(row_capped(r, m) is not None for r in usable for m in modes)
    out = {f"{mode}_capped": None for mode in MODES}
    out.update(capped_rows=None, uncapped_rows=None, uncapped_speedup=None)
    if not recorded:
        return out
    for mode in modes:
        out[f"{mode}_capped"] = sum(row_capped(r, mode) is True for r in usable)
    out["capped_rows"] = sum(any(row_capped(r, m) is True for m in modes) for r in usable)
    uncapped = [r for r in usable if all(row_capped(r, m) is False for m in modes)]
    out["uncapped_rows"] = len(uncapped)
    normal = _mean(row_speed(r, "normal") for r in uncapped) if "normal" in modes else None
    parallel = _mean(row_speed(r, "parallel") for r in uncapped) if "parallel" in modes else None
    out["uncapped_speedup"] = parallel / normal if normal and parallel is not None else None
    return out


def throughput_summary(rows):
    """Throughput of a batched run (generate.py --batch_size N > 1); {} for a file without batch passes (batch
    size 1, earlier versions, the reference implementation), so its summary gains no field.

    - ``<mode>_throughput``: the mode's generated tokens over its batch passes' wall time, summed over the distinct
      batches the rows record (``batch``, ``<mode>_batch_time``, ``<mode>_batch_tokens``); rows with an error count
      too, since their pass ran and its time and tokens hold every request of the batch;
    - ``throughput_ratio``: parallel / normal throughput;
    - ``batches``: distinct batches; ``batch_size``: the run's --batch_size (from the rows' settings).
    """
    rates = {mode: throughput(rows, mode) for mode in MODES}
    if all(rate is None for rate in rates.values()):
        return {}
    batches = set().union(*(batch_passes(rows, mode) for mode in MODES))
    sizes = {
        r["settings"].get("batch_size")
        for r in rows
        if r.get("batch") in batches and isinstance(r.get("settings"), dict)
    }
    return {
        "batch_size": sizes.pop() if len(sizes) == 1 else None,
        "batches": len(batches),
        "normal_throughput": rates["normal"],
        "parallel_throughput": rates["parallel"],
        "throughput_ratio": _ratio(rates["parallel"], rates["normal"]),
    }


def answer_metrics(rows, task):
    """Judge-free answer quality per mode: retrieval accuracy (EM), multi-document QA accuracy (EM) and F1.

    Rows with a non-empty ``error`` and modes whose response is missing are left out; ``metric_rows`` counts the
    rows scored. Planning has no judge-free metric (returns {}).
    """
    if task == "planning":
        return {}
    out = {}
    for mode in MODES:
        ems, f1s = [], []
        for row in rows:
            response = row.get(f"{mode}_response")
            if not is_blank(row.get("error")) or not isinstance(response, str):
                continue
            if task == "retrieval":
                ems.append(retrieval_exact_match(response, row.get("gold_keys")))
            elif task == "multi-document-qa":
                em, f1 = qa_scores(response, row.get("answers"))
                ems.append(em)
                f1s.append(f1)
            else:
                raise ValueError(f"unknown task {task!r}")
        out[f"{mode}_accuracy"] = _mean(ems)
        out[f"{mode}_metric_rows"] = len(ems)
        if task == "multi-document-qa":
            out[f"{mode}_f1"] = _mean(f1s)
    return out


# A closed block in an answer: a `####Title:` step, then later the `####%%%%` that closes the block.
_CLOSED_BLOCK_RE = re.compile(r"####[^\n]*?[:：].*?####%%%%", re.DOTALL)
# Kinds of the engine's `fallback` texts (parallel_decoding/engine/decode.py), by a phrase each contains.
FALLBACK_KINDS = (
    ("no_block", "wrote no ####Title: block"),
    ("unclosed_block", "did not close it with ####%%%%"),
)


def wrote_closed_block(row):
    """True if the row's parallel answer wrote at least one closed ``####`` block that was decoded in parallel.

    The engine's own record decides where the row has one (``num_parallel_branches`` > 0); files without it (the
    reference implementation's) are read from the answer text.
    """
    branches = as_number(row.get("num_parallel_branches"))
    if branches is not None:
        return branches > 0
    response = row.get("parallel_response")
    return isinstance(response, str) and _CLOSED_BLOCK_RE.search(response) is not None


def fallback_kind(reason):
    """Short kind of a fallback reason: ``no_block``, ``unclosed_block``, or for a text this list does not know,
    the text up to its first ``;``."""
    for kind, phrase in FALLBACK_KINDS:
        if phrase in reason:
            return kind
    return reason.split(";")[0].strip()


def format_summary(rows):
    """How well the parallel answers kept the branch format.

    - ``format_rows``: rows with a parallel answer and no error; ``format_adherent_rows``: of those, the rows whose
      answer wrote at least one closed block (:func:`wrote_closed_block`); ``format_adherence``: their share;
    - ``fallback_reasons``: ``{kind: rows}`` over the rows with a non-empty ``fallback`` (sums to ``fallback_rows``).

    Returns {} when no row has a parallel answer.
    """
    considered = [r for r in rows if is_blank(r.get("error")) and isinstance(r.get("parallel_response"), str)]
    if not considered:
        return {}
    adherent = sum(1 for r in considered if wrote_closed_block(r))
    reasons = collections.Counter(fallback_kind(str(r["fallback"])) for r in rows if not is_blank(r.get("fallback")))
    return {
        "format_rows": len(considered),
        "format_adherent_rows": adherent,
        "format_adherence": adherent / len(considered),
        "fallback_reasons": dict(sorted(reasons.items())),
    }


def score_summary(rows):
    """Judge scores per mode: mean over the rows that have a score (missing verdicts are skipped, never 0).

    ``judged_rows`` counts rows with both scores; ``<mode>_scored`` the rows with that mode's score.
    Returns {} when no row carries a score.
    """
    scores = {m: [as_number(r.get(f"{m}_score")) for r in rows if is_blank(r.get("error"))] for m in MODES}
    if all(s is None for m in MODES for s in scores[m]):
        return {}
    out = {}
    for mode in MODES:
        present = [s for s in scores[mode] if s is not None]
        out[f"{mode}_score"] = _mean(present)
        out[f"{mode}_scored"] = len(present)
    out["judged_rows"] = sum(
        1 for r in rows if is_blank(r.get("error")) and all(as_number(r.get(f"{m}_score")) is not None for m in MODES)
    )
    return out
