"""LLM-as-judge through any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp).

One request grades one answer on a 1-5 scale with a short rationale. Who retries what:

- the ``openai`` client is built with ``max_retries=0``: it never retries on its own;
- :meth:`Judge.request` retries transient failures (HTTP 429, HTTP 5xx, timeouts, dropped connections) with
  exponential backoff ``backoff_base * 2**attempt`` (capped at ``backoff_max``, at least the server's
  ``Retry-After``), up to ``max_retries`` extra attempts; any other error (401, 400, 404, ...) is raised at once;
- :meth:`Judge.grade` asks again once more (``parse_retries``) when the verdict carries no parseable score, then
  records the score as missing (None), never as 0.

The API key is never put into an error message: every text that leaves this module goes through :meth:`scrub`.
"""

import dataclasses
import json
import random
import re
import time

import openai

from .metrics import SCORE_MAX, SCORE_MIN, has_cjk

# ---------------------------------------------------------------------------------------------------------------------
# Prompts (the project's own wording)

SYSTEM_PROMPT_EN = "You grade answers written by an AI assistant. You are strict, consistent and brief."

USER_PROMPT_EN = """\
Grade the assistant's answer to the question below, using the reference answer as the standard of correctness.

Scale:
5 - correct and complete; agrees with the reference and addresses everything the question asks.
4 - correct in substance, with minor omissions or small inaccuracies.
3 - partly correct: some key points right, others missing or wrong.
2 - mostly wrong or mostly irrelevant, with only a little of value.
1 - wrong, off-topic, empty, or a degenerate/repetitive text.

Judge the content only. Section markers such as "####Title:" or "####%%%%" belong to the generation format and
must neither raise nor lower the grade. Length is not a merit by itself.

[Question]
{question}

[Reference answer]
{reference}

[Assistant's answer]
{answer}

Reply with exactly two lines:
Rationale: <one or two sentences>
Score: <an integer from 1 to 5>"""

SYSTEM_PROMPT_ZH = "你是一名评阅人工智能助手回答的评审，评分严格、一致、简洁。"

USER_PROMPT_ZH = """\
请以参考答案为正确性标准，评阅助手对下面问题的回答。

评分标准：
5 - 正确且完整：与参考答案一致，回应了问题的所有要求。
4 - 实质正确，有少量遗漏或细小错误。
3 - 部分正确：部分要点正确，其余缺失或错误。
2 - 大部分错误或离题，只有少量有价值的内容。
1 - 错误、离题、空白，或内容重复、退化。

只评内容。"####Title:"、"####%%%%" 之类的分段标记属于生成格式，不应加分或减分。篇幅长短本身不是优点。

【问题】
{question}

【参考答案】
{reference}

【助手的回答】
{answer}

请严格按两行回复：
理由：<一到两句话>
评分：<1 到 5 的整数>"""


def build_messages(question, reference, answer):
    """Chat messages for one grading request; Chinese prompt when the question contains Chinese characters."""
    chinese = has_cjk(question)
    system, user = (SYSTEM_PROMPT_ZH, USER_PROMPT_ZH) if chinese else (SYSTEM_PROMPT_EN, USER_PROMPT_EN)
    user = user.format(question=question.strip(), reference=reference.strip(), answer=answer.strip())
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ---------------------------------------------------------------------------------------------------------------------
# Verdict parsing

_NUMBER = r"(\d+(?:\.\d+)?)"
# "Score: 4", "**Score**: 4/5", "评分：4", "分数: 4 分", "Rating - 4"; the last such line wins.
_LABELLED_SCORE_RE = re.compile(
    r"(?:score|rating|grade|评分|分数|得分)\s*[*_]*\s*[:：=\-]?\s*[*_]*\s*" + _NUMBER + r"(?:\s*/\s*5)?",
    re.IGNORECASE,
)
_BRACKET_SCORE_RE = re.compile(r"\[\[\s*" + _NUMBER + r"\s*\]\]")  # "[[4]]"
_OUT_OF_FIVE_RE = re.compile(_NUMBER + r"\s*(?:/|out of)\s*5\b", re.IGNORECASE)  # "4/5", "4 out of 5"
_RATIONALE_RE = re.compile(r"(?:rationale|reason|理由)\s*[*_]*\s*[:：]\s*[*_]*\s*(.*)", re.IGNORECASE | re.DOTALL)
_SCORE_LINE_RE = re.compile(
    r"^.*(?:score|rating|grade|评分|分数|得分)\s*[*_]*\s*[:：=].*$", re.IGNORECASE | re.MULTILINE
)
_JSON_OBJECT_RE = re.compile(r"\{.*?\}", re.DOTALL)


def _valid_score(value):
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return score if SCORE_MIN <= score <= SCORE_MAX else None


def parse_score(text):
    """The 1-5 score in a verdict, or None if there is none.

    Tried in order: a JSON object with a "score" key; the last labelled score ("Score: 4", "评分：4"); "[[4]]";
    "4/5". A number outside 1-5 is not a score.
    """
    if not text:
        return None
    for match in _JSON_OBJECT_RE.finditer(text):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "score" in obj:
            score = _valid_score(obj["score"])
            if score is not None:
                return score
    for pattern in (_LABELLED_SCORE_RE, _BRACKET_SCORE_RE, _OUT_OF_FIVE_RE):
        matches = pattern.findall(text)
        if matches:
            score = _valid_score(matches[-1])
            if score is not None:
                return score
    return None


def parse_rationale(text):
    """The rationale part of a verdict: the text after "Rationale:"/"理由：" without the score line, else the whole
    verdict without its score line."""
    if not text:
        return ""
    match = _RATIONALE_RE.search(text)
    body = match.group(1) if match else text
    return _SCORE_LINE_RE.sub("", body).strip()


# ---------------------------------------------------------------------------------------------------------------------
# Client


class JudgeError(RuntimeError):
    """A grading request failed for good (non-retryable error, or retries exhausted). The message is key-free."""


class JudgeCancelled(JudgeError):
    """The caller's stop event was set before the next attempt."""


@dataclasses.dataclass
class Verdict:
    score: float | None  # None: no parseable score after the parse retry
    rationale: str
    raw: str  # the judge's last reply, verbatim (scrubbed)


def _retryable(error):
    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError)):
        return True
    return isinstance(error, openai.APIStatusError) and error.status_code >= 500


def _retry_after_seconds(error):
    response = getattr(error, "response", None)
    if response is None:
        return None
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Judge:
    """Grades answers with one chat-completions request each; safe to call from several threads."""

    def __init__(
        self,
        model_name,
        api_key,
        base_url=None,
        *,
        timeout=120.0,
        max_retries=5,
        backoff_base=1.0,
        backoff_max=60.0,
        parse_retries=1,
        max_tokens=512,
        temperature=0.0,
    ):
        if not api_key:
            raise ValueError("the judge needs an API key (--api_key or OPENAI_API_KEY)")
        if max_retries < 0 or parse_retries < 0 or backoff_base < 0 or backoff_max < 0 or timeout <= 0:
            raise ValueError("max_retries, parse_retries and backoff must be >= 0 and timeout > 0")
        self.model_name = model_name
        self._api_key = api_key
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.parse_retries = parse_retries
        self.max_tokens = max_tokens
        self.temperature = temperature
        # max_retries=0: retries are ours (request()), so that backoff and what counts as transient are explicit.
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)

    def scrub(self, text):
        """``text`` with every occurrence of the API key masked."""
        text = str(text)
        return text.replace(self._api_key, "***") if self._api_key else text

    def backoff_delay(self, attempt, error=None):
        """Seconds to wait before retry number ``attempt`` (0-based): exponential, jittered up by at most 25 %,
        never below the server's Retry-After, capped at ``backoff_max``."""
        delay = self.backoff_base * (2**attempt) * (1.0 + 0.25 * random.random())
        retry_after = _retry_after_seconds(error) if error is not None else None
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.backoff_max)

    def request(self, messages, stop=None):
        """The text of one chat completion, retrying transient failures with exponential backoff.

        ``stop`` (a threading.Event), when set, ends the retries early with JudgeCancelled (used on Ctrl-C and after
        another request failed for good)."""
        for attempt in range(self.max_retries + 1):
            if stop is not None and stop.is_set():
                raise JudgeCancelled("judge request cancelled")
            try:
                completion = self.client.chat.completions.create(
                    model=self.model_name,
                    messages=messages,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                )
            except openai.OpenAIError as error:
                if not _retryable(error):
                    raise JudgeError(f"judge request failed: {self.scrub(_describe(error))}") from None
                if attempt == self.max_retries:
                    raise JudgeError(
                        f"judge request failed after {attempt + 1} attempts: {self.scrub(_describe(error))}"
                    ) from None
                delay = self.backoff_delay(attempt, error)
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
                continue
            return _reply_text(completion)
        raise AssertionError("unreachable")

    def grade(self, question, reference, answer, stop=None):
        """A :class:`Verdict` for one answer. An unparseable verdict is asked for again ``parse_retries`` times,
        then returned with ``score=None``. ``stop``: see :meth:`request`."""
        messages = build_messages(question, reference, answer)
        for _ in range(self.parse_retries + 1):
            text = self.scrub(self.request(messages, stop))
            score = parse_score(text)
            if score is not None:
                return Verdict(score=score, rationale=parse_rationale(text), raw=text)
        return Verdict(score=None, rationale=f"unparseable verdict: {text.strip() or '(empty reply)'}", raw=text)


def _reply_text(completion):
    """The first choice's text; "" for a reply without one (a malformed body from a non-OpenAI server included)."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices:
        return ""
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    return content if isinstance(content, str) else ""


def _describe(error):
    """A one-line description of an openai error (type, HTTP status, message)."""
    status = getattr(error, "status_code", None)
    head = f"{type(error).__name__}" + (f" (HTTP {status})" if status is not None else "")
    message = " ".join(str(error).split())
    return f"{head}: {message}" if message else head
