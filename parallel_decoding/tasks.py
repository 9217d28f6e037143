"""Task definitions: which field of a dataset row holds the text, the task instruction and the branch-format
instruction appended to it, and loading/validating a dataset file of the task's format.

The format instruction is the only thing that teaches a model the parallel block; the task instruction says what
the independent steps are for this task (one per student, one per fact, one per planning dimension).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path


# --- branch-format instructions -------------------------------------------------------------------------------

FORMAT_INSTRUCTION_EN = (
    "Answer format: steps that do not depend on each other form a parallel block. Write each such step on its own "
    "line as `####Title: content`; no step may use the result of another. After the last step write `####%%%%` on "
    "its own line, then give the conclusion that combines the steps."
)
FORMAT_INSTRUCTION_ZH = (
    "回答格式：彼此独立的步骤组成一个并行块。每个步骤单独一行，写成 `####标题: 内容`，任何步骤都不能使用其他步骤的结果。"
    "最后一个步骤之后单独一行写 `####%%%%`，然后给出综合各步骤的结论。"
)

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
    "multi-document-qa": Task("multi-document-qa", ("input", "context"), "multi_document_qa.jsonl",
                              skip_too_long=True),
    "planning": Task("planning", ("task",), "planning.jsonl", skip_too_long=False),
}


def find_data_dir() -> Path:
    """data/ of the source checkout the package is imported from (an editable install, or the repo root on
    sys.path); a regular install has no data/ beside it, so there it is data/ in the working directory (the repo
    root, when the commands run from there)."""
    beside = Path(__file__).resolve().parents[1] / "data"
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


def build_prompt(task: str, row: dict) -> str:
    """The full user message: the row's text, the task instruction, then the branch-format instruction."""
    get_task(task)
    if task == "retrieval":
        return f"{row['prompt']}\n\n{RETRIEVAL_INSTRUCTION}\n{FORMAT_INSTRUCTION_EN}"
    if task == "multi-document-qa":
        text = f"{MULTI_DOC_QA_HEADER}{row['context'].strip()}\n\nQuestion: {row['input'].strip()}"
        return f"{text}\n\n{MULTI_DOC_QA_INSTRUCTION}\n{FORMAT_INSTRUCTION_EN}"
    text = row["task"].strip()
    if is_chinese(row, text):
        return f"{text}\n\n{PLANNING_INSTRUCTION_ZH}\n{FORMAT_INSTRUCTION_ZH}"
    return f"{text}\n\n{PLANNING_INSTRUCTION_EN}\n{FORMAT_INSTRUCTION_EN}"


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
