"""Task definitions: which field of a dataset row holds the text, the task instruction and the branch-format
instruction appended to it, and loading/validating a dataset file of the task's format.

The format instruction is the only thing that teaches a model the parallel block; the task instruction says what
the independent steps are for this task (one per student, one per fact, one per planning dimension).
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

# --- branch-format instructions -------------------------------------------------------------------------------

FORMAT_INSTRUCTION_EN = (
    "Answer format: steps that do not depend on each other form a parallel block. Write each such step on its own "
    "line as `####Title: content`; no step may use the result of another. Only these independent steps start with "
    "`####`: the opening sentence, the conclusion and any step that needs another step's result are plain text. "
    "After the last step write `####%%%%` on its own line, then give the conclusion that combines the steps. "
    "For example:\n"
    "To pick a laptop for travel, I check three things separately.\n"
    "####Weight: A weighs 1.1 kg, B weighs 1.6 kg.\n"
    "####Battery: A lasts 12 hours, B lasts 9 hours.\n"
    "####Price: A costs 900 dollars, B costs 700 dollars.\n"
    "####%%%%\n"
    "A is lighter and lasts longer for 200 dollars more, so A suits travel better."
)
FORMAT_INSTRUCTION_ZH = (
    "回答格式：彼此独立的步骤组成一个并行块。每个步骤单独一行，写成 `####标题: 内容`，"
    "任何步骤都不能使用其他步骤的结果。"
    "只有这些独立步骤以 `####` 开头；开头的引言、结论以及需要其他步骤结果的步骤都写成普通文字。"
    "最后一个步骤之后单独一行写 `####%%%%`，然后给出综合各步骤的结论。例如：\n"
    "为出差挑选笔记本电脑，我分别检查三个方面。\n"
    "####重量: A 重 1.1 公斤，B 重 1.6 公斤。\n"
    "####续航: A 能用 12 小时，B 能用 9 小时。\n"
    "####价格: A 售价 900 美元，B 售价 700 美元。\n"
    "####%%%%\n"
    "A 更轻、续航更长，只贵 200 美元，所以 A 更适合出差。"
)
# A format instruction that contains this placeholder wraps the task text there instead of following it.
TASK_PLACEHOLDER = "{task}"
# A model directory may hold the format instruction the model was trained with (see docs/tiny_model.md).
MODEL_FORMAT_PROMPT_FILE = "format_prompt.txt"
# ... and the tasks it was trained for, one per line: the embedded toy knows retrieval only.
MODEL_TASKS_FILE = "trained_tasks.txt"

# --- task instructions ----------------------------------------------------------------------------------------

RETRIEVAL_INSTRUCTION = (
    "Check every student in a parallel step `####<student name>: ...`, one step per student, stating the GPA and "
    "whether it lies in the range. Close the block with `####%%%%` and end with the line `Final answer: <name>`."
)
MULTI_DOC_QA_INSTRUCTION = (
    "Answer the question using the passages. Look up each fact the question needs in a parallel step "
    "`####<entity>: ...`, one step per entity, quoting what its passage says. Close the block with `####%%%%`, "
    "combine the facts, and end with the line `Final answer: <answer>` giving only the answer."
)
PLANNING_INSTRUCTION_EN = (
    "Analyse each dimension of the task in a parallel step `####<dimension>: ...`, one step per dimension, each "
    "independent of the others. Close the block with `####%%%%`, then write a synthesis that turns the analyses "
    "into one plan."
)
PLANNING_INSTRUCTION_ZH = (
    "请把任务的每个维度写成一个并行步骤 `####<维度>: ...`，每个维度一个步骤，彼此独立。"
    "用 `####%%%%` 结束该部分，然后写一段综合，把各维度的分析整合成一个完整方案。"
)

MULTI_DOC_QA_HEADER = "The following passages are given.\n\n"

_CJK = re.compile(r"[\u4e00-\u9fff]")


class DatasetError(ValueError):
    """A dataset file that cannot be used: unreadable, a line that does not parse, a row missing a field."""


@dataclass(frozen=True)
class Task:
    name: str
    required_fields: tuple  # fields every row must have (the first holds the row's main text)
    default_data: str  # file name under data/
    skip_too_long: bool  # skip rows whose prompt exceeds the model's usable context instead of recording an error


TASKS = {
    "retrieval": Task("retrieval", ("prompt",), "retrieval_4.jsonl", skip_too_long=False),
    "multi-document-qa": Task("multi-document-qa", ("input", "context"), "multi_document_qa.jsonl", skip_too_long=True),
    "planning": Task("planning", ("task",), "planning.jsonl", skip_too_long=False),
}


def find_data_dir() -> Path:
    """data/ of the source checkout the package is imported from (an editable install, or the repo root on
    sys.path); a regular install has no data/ beside it, so there it is data/ in the working directory (the repo
    root, when the commands run from there)."""
    beside = Path(__file__).resolve().parents[2] / "data"
    return beside if (beside / TASKS["retrieval"].default_data).is_file() else Path.cwd() / "data"


DATA_DIR = find_data_dir()


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def default_data_path(task: str) -> Path:
    return DATA_DIR / get_task(task).default_data


def is_chinese(row: dict, text: str) -> bool:
    """A row's `language` field decides when present (LongBench uses "en"/"zh"); else any CJK character does."""
    language = row.get("language")
    if isinstance(language, str) and language:
        return language.lower().startswith("zh")
    return bool(_CJK.search(text))


def task_text(task: str, row: dict) -> str:
    """The row's text followed by the task instruction: everything of the prompt but the format instruction."""
    get_task(task)
    if task == "retrieval":
        return f"{row['prompt']}\n\n{RETRIEVAL_INSTRUCTION}"
    if task == "multi-document-qa":
        text = f"{MULTI_DOC_QA_HEADER}{row['context'].strip()}\n\nQuestion: {row['input'].strip()}"
        return f"{text}\n\n{MULTI_DOC_QA_INSTRUCTION}"
    text = row["task"].strip()
    if is_chinese(row, text):
        return f"{text}\n\n{PLANNING_INSTRUCTION_ZH}"
    return f"{text}\n\n{PLANNING_INSTRUCTION_EN}"


def default_format_instruction(task: str, row: dict) -> str:
    """The project's format instruction for the row: Chinese for Chinese planning rows, else English."""
    if task == "planning" and is_chinese(row, row["task"].strip()):
        return FORMAT_INSTRUCTION_ZH
    return FORMAT_INSTRUCTION_EN


def build_prompt(task: str, row: dict, format_instruction: str | None = None) -> str:
    """The full user message: the task text (row text + task instruction), then the format instruction.

    ``format_instruction`` replaces the project's default (see :func:`read_format_prompt`); one that contains
    ``{task}`` wraps the task text at that placeholder instead of following it.
    """
    text = task_text(task, row)
    instruction = default_format_instruction(task, row) if format_instruction is None else format_instruction
    if TASK_PLACEHOLDER in instruction:
        return instruction.replace(TASK_PLACEHOLDER, text)
    return f"{text}\n{instruction}"


class FormatPromptError(ValueError):
    """A format instruction file that cannot be used; the message is one line that starts with the file's path."""


def read_format_prompt(path) -> str:
    """The format instruction held in a UTF-8 text file, without surrounding whitespace (an editor's final newline
    is not part of it). FormatPromptError if the file is missing, unreadable, not UTF-8, empty, or holds more than
    one ``{task}`` placeholder."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FormatPromptError(f"{path}: no such file") from None
    except OSError as e:
        raise FormatPromptError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig").strip()  # "-sig": a byte-order mark some editors write is not text
    except UnicodeDecodeError as e:
        raise FormatPromptError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text:
        raise FormatPromptError(f"{path}: the file is empty")
    placeholders = text.count(TASK_PLACEHOLDER)
    if placeholders > 1:
        raise FormatPromptError(f"{path}: {placeholders} {TASK_PLACEHOLDER} placeholders; at most one is allowed")
    return text


def format_prompt_digest(text: str | None) -> str:
    """sha256 of a format instruction; for the default (None), of both default instructions, so a change to the
    project's wording shows up in a run's settings too."""
    if text is None:
        text = f"{FORMAT_INSTRUCTION_EN}\n{FORMAT_INSTRUCTION_ZH}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class FormatPrompt:
    """The format instruction of a run: ``text`` None is the project's default (English, or Chinese for Chinese
    planning rows); ``path`` the file it came from; ``source`` "file" (--format_prompt_file), "model" (the model
    directory's own) or "default"."""

    text: str | None
    path: str | None
    source: str

    def setting(self) -> dict:
        """What the run's settings record: the instruction's text (by its digest) shapes the rows, and so does the
        file a user named with --format_prompt_file (absolute, so the same file named from another folder is the
        same setting). A model's own format_prompt.txt is part of the model, which is recorded already, so only its
        text counts."""
        path = os.path.realpath(self.path) if self.source == "file" else None
        return {"file": path, "sha256": format_prompt_digest(self.text)}

    def describe(self) -> str:
        if self.source == "file":
            return f"format instruction: {self.path} (--format_prompt_file)"
        if self.source == "model":
            return (
                f"format instruction: {self.path}, the one this model was trained with "
                f"(--format_prompt_file overrides it)"
            )
        return "format instruction: the project's default (parallel_decoding/tasks.py)"


def resolve_format_prompt(format_prompt_file, model_path) -> FormatPrompt:
    """--format_prompt_file if given; else the model directory's format_prompt.txt (the prompt a model was trained
    with is part of that model); else the project's default. FormatPromptError (one line naming the flag or the
    model's file) for a file that cannot be used."""
    if format_prompt_file is not None:
        try:
            return FormatPrompt(read_format_prompt(format_prompt_file), str(format_prompt_file), "file")
        except FormatPromptError as e:
            raise FormatPromptError(f"--format_prompt_file {e}") from None
    model_file = Path(model_path) / MODEL_FORMAT_PROMPT_FILE
    if model_file.is_file():
        try:
            return FormatPrompt(read_format_prompt(model_file), str(model_file), "model")
        except FormatPromptError as e:
            raise FormatPromptError(f"the model's format instruction {e}") from None
    return FormatPrompt(None, None, "default")


def model_task_warning(model_path, task: str) -> str | None:
    """One line for a model whose directory lists the tasks it was trained for (``trained_tasks.txt``) when `task`
    is not one of them; None otherwise (a real checkpoint has no such file)."""
    tasks_file = Path(model_path) / MODEL_TASKS_FILE
    if not tasks_file.is_file():
        return None
    text = tasks_file.read_text(encoding="utf-8", errors="replace")
    tasks = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if task in tasks:
        return None
    trained = ", ".join(tasks) or "no task"
    return (
        f"warning: {model_path} was trained for {trained} only, so its {task} answers mean nothing: pass "
        f"--model_path with a real checkpoint (a hub id such as Qwen/Qwen2.5-7B-Instruct, or a local directory)"
    )


def validate_row(task: str, row, where: str) -> None:
    """Raise DatasetError naming `where` (file:line) if the row is not a JSON object with the task's text fields."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in get_task(task).required_fields:
        if field not in row:
            raise DatasetError(f"{where}: row has no {field!r} field, which task {task!r} needs")
        if not isinstance(row[field], str) or not row[field].strip():
            raise DatasetError(f"{where}: field {field!r} must be a non-empty string")


def load_dataset(task: str, path) -> list:
    """Read a jsonl (one object per line; blank lines ignored) or a .json list and validate every row."""
    get_task(task)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read dataset {path}: {e}") from None
    rows = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: a .json dataset must hold a list of rows")
        for i, row in enumerate(data):
            validate_row(task, row, f"{path}: row {i}")
            rows.append(row)
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            validate_row(task, row, f"{path}:{lineno}")
            rows.append(row)
    if not rows:
        raise DatasetError(f"dataset {path} has no rows")
    return rows
