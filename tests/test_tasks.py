"""Task definitions, dataset loading/validation and the seeded data generators (no model needed)."""

import json

import pytest

from parallel_decoding.tasks import (
    DATA_DIR,
    FORMAT_INSTRUCTION_EN,
    FORMAT_INSTRUCTION_ZH,
    MULTI_DOC_QA_INSTRUCTION,
    PLANNING_INSTRUCTION_ZH,
    RETRIEVAL_INSTRUCTION,
    DatasetError,
    FormatPromptError,
    build_prompt,
    default_data_path,
    format_prompt_digest,
    load_dataset,
    read_format_prompt,
    task_text,
)
from parallel_decoding.tasks.multi_doc_qa import make_multi_doc_qa_rows
from parallel_decoding.tasks.planning import main as planning_main
from parallel_decoding.tasks.planning import make_planning_rows
from parallel_decoding.tasks.retrieval import main as retrieval_main
from parallel_decoding.tasks.retrieval import make_retrieval_rows, student_line, write_jsonl

LONGBENCH_KEYS = {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}


# --- generators: determinism and the committed files ----------------------------------------------------------


def _bytes(rows, path):
    write_jsonl(rows, path)
    return path.read_bytes()


def test_retrieval_same_seed_same_bytes(tmp_path):
    a = _bytes(make_retrieval_rows(10, 5, seed=7), tmp_path / "a.jsonl")
    b = _bytes(make_retrieval_rows(10, 5, seed=7), tmp_path / "b.jsonl")
    c = _bytes(make_retrieval_rows(10, 5, seed=8), tmp_path / "c.jsonl")
    assert a == b and a != c


def test_retrieval_rows_are_a_prefix_of_a_larger_file():
    assert make_retrieval_rows(4, 3, seed=3) == make_retrieval_rows(4, 6, seed=3)[:3]


def test_multi_doc_qa_same_seed_same_bytes(tmp_path):
    a = _bytes(make_multi_doc_qa_rows(6, seed=1), tmp_path / "a.jsonl")
    b = _bytes(make_multi_doc_qa_rows(6, seed=1), tmp_path / "b.jsonl")
    c = _bytes(make_multi_doc_qa_rows(6, seed=2), tmp_path / "c.jsonl")
    assert a == b and a != c


@pytest.mark.parametrize(
    "name, make",
    [
        ("retrieval_4.jsonl", lambda: make_retrieval_rows(4, 50, seed=1234)),
        ("retrieval_10.jsonl", lambda: make_retrieval_rows(10, 50, seed=1234)),
        ("multi_document_qa.jsonl", lambda: make_multi_doc_qa_rows(30, seed=1234)),
        ("planning.jsonl", make_planning_rows),
    ],
)
def test_committed_data_is_what_the_generator_writes(tmp_path, name, make):
    assert _bytes(make(), tmp_path / name) == (DATA_DIR / name).read_bytes()


def test_generator_clis_write_files(tmp_path, capsys):
    assert retrieval_main(["--num_students", "30", "--num_rows", "2", "--output", str(tmp_path / "r30.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r30.jsonl").read_text().splitlines()]
    assert [len(r["students"]) for r in rows] == [30, 30]
    assert retrieval_main(["--num_students", "1", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "num_students must be in" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
    assert planning_main(["--output", str(tmp_path / "p.jsonl")]) == 0
    assert (tmp_path / "p.jsonl").read_bytes() == (DATA_DIR / "planning.jsonl").read_bytes()


# --- generated content is right ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_students", [4, 10, 100])
def test_retrieval_row_has_exactly_one_student_in_range(num_students):
    for row in make_retrieval_rows(num_students, 20, seed=5):
        lo, hi = row["gpa_range"]
        assert lo < hi
        inside = [s for s in row["students"] if lo <= s["gpa"] <= hi]
        assert [s["name"] for s in inside] == [row["gold_keys"]]
        assert row["gold_values"] == f"{inside[0]['gpa']:.2f}"
        assert len({s["name"] for s in row["students"]}) == num_students
        lines = [
            line for line in row["prompt"].splitlines() if line.split(":")[0] in {s["name"] for s in row["students"]}
        ]
        assert lines == [student_line(s) for s in row["students"]]  # in the prompt, in the students' order
        assert f"between {lo:.2f} and {hi:.2f}" in row["prompt"]


def test_retrieval_prompts_are_compact():
    rows = make_retrieval_rows(10, 50, seed=1234)
    assert max(len(r["prompt"]) for r in rows) < 1300


def test_multi_doc_qa_rows_are_longbench_shaped_with_facts_in_separate_passages():
    rows = make_multi_doc_qa_rows(12, seed=1234)
    assert {r["type"] for r in rows} == {"comparison", "people_comparison", "compositional", "bridge_comparison"}
    for row in rows:
        assert LONGBENCH_KEYS <= set(row)
        assert row["length"] == len(row["context"].split())
        assert isinstance(row["answers"], list) and row["answers"][0]
        assert row["context"].startswith("Passage 1:\n")
        titles = [block.split("\n")[1] for block in row["context"].split("Passage ")[1:]]
        assert len(titles) == len(set(titles)) > len(row["evidence_titles"])  # distractors too
        assert set(row["evidence_titles"]) <= set(titles)
        for title in row["evidence_titles"][:2]:
            assert title in row["input"] or row["type"] == "compositional"


def test_compositional_answer_sits_in_the_second_passage_only():
    rows = [r for r in make_multi_doc_qa_rows(16, seed=9) if r["type"] == "compositional"]
    assert rows
    for row in rows:
        work, person = row["evidence_titles"]
        passages = {b.split("\n")[1]: b for b in row["context"].split("Passage ")[1:]}
        assert person in passages[work]  # hop 1: the work's passage names the person
        assert row["answers"][0] in passages[person]  # hop 2: the person's passage holds the answer
        assert person not in row["input"]


def test_planning_tasks_count_languages_and_answers():
    rows = make_planning_rows()
    english = [r for r in rows if r["language"] == "en"]
    chinese = [r for r in rows if r["language"] == "zh"]
    assert len(rows) >= 40 and len(english) >= 30 and len(chinese) >= 10
    assert all(len(r["answer"]) > 400 for r in english) and all(len(r["answer"]) > 200 for r in chinese)


# --- prompts -------------------------------------------------------------------------------------------------------


def test_build_prompt_appends_task_then_format_instruction():
    row = make_retrieval_rows(4, 1, seed=1)[0]
    assert build_prompt("retrieval", row) == f"{row['prompt']}\n\n{RETRIEVAL_INSTRUCTION}\n{FORMAT_INSTRUCTION_EN}"
    assert "####%%%%" in RETRIEVAL_INSTRUCTION and "Final answer: <name>" in RETRIEVAL_INSTRUCTION
    assert "####Title:" in FORMAT_INSTRUCTION_EN and "####%%%%" in FORMAT_INSTRUCTION_EN


def test_planning_language_picks_the_format_instruction():
    en = build_prompt("planning", {"task": "Plan a trip.", "answer": "..."})
    zh = build_prompt("planning", {"task": "规划一次旅行。", "answer": "..."})
    assert en.endswith(FORMAT_INSTRUCTION_EN)
    assert zh == f"规划一次旅行。\n\n{PLANNING_INSTRUCTION_ZH}\n{FORMAT_INSTRUCTION_ZH}"
    assert build_prompt("planning", {"task": "Plan it", "language": "zh"}).endswith(FORMAT_INSTRUCTION_ZH)


# The worked example is the tail of each default instruction, after this lead.
EXAMPLE_LEADS = {"en": "For example:\n", "zh": "例如：\n"}
EXAMPLE_TITLES = {"en": ["Weight", "Battery", "Price"], "zh": ["重量", "续航", "价格"]}
DEFAULT_INSTRUCTIONS = {"en": FORMAT_INSTRUCTION_EN, "zh": FORMAT_INSTRUCTION_ZH}


@pytest.mark.parametrize("language", ["en", "zh"])
def test_default_prompt_renders_with_the_qwen2_vocabulary(qwen_tokenizer, language):
    """The default prompt survives Qwen2's chat template and tokenizer unchanged (no lost or merged characters)."""
    row = {"task": "Plan a trip." if language == "en" else "规划一次旅行。", "language": language}
    prompt = build_prompt("planning", row)
    assert prompt.endswith(DEFAULT_INSTRUCTIONS[language])
    rendered = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert prompt in rendered
    ids = qwen_tokenizer.encode(rendered, add_special_tokens=False)
    assert qwen_tokenizer.decode(ids) == rendered


@pytest.mark.parametrize("language", ["en", "zh"])
def test_worked_example_markers_tokenize_as_the_skeleton_processor_expects(qwen_tokenizer, language):
    """The example block, written by a model token for token, parses into its titles: each `####` is a branch
    token, each title ends on a colon token, `####%%%%` closes the block, and the lead-in line is the shared
    prefix before the first `####`."""
    from parallel_decoding import MarkerVocab, parse_skeleton

    instruction = DEFAULT_INSTRUCTIONS[language]
    example = instruction[instruction.index(EXAMPLE_LEADS[language]) + len(EXAMPLE_LEADS[language]) :]
    lead_in, _, block = example.partition("\n")
    assert [line.startswith("####") for line in block.splitlines()] == [True] * 4 + [False]
    assert block.splitlines()[3] == "####%%%%"
    markers = MarkerVocab.from_tokenizer(qwen_tokenizer)
    tokens = qwen_tokenizer.encode(example, add_special_tokens=False)
    parsed = parse_skeleton(tokens, markers, qwen_tokenizer)
    assert parsed is not None
    assert parsed.titles == EXAMPLE_TITLES[language]
    assert qwen_tokenizer.decode(tokens[: parsed.start]) == lead_in + "\n"
    assert qwen_tokenizer.decode(parsed.closing) == "####%%%%"
    assert all(markers.is_branch(prefix[0]) and prefix[-1] in markers.colon_ids for prefix in parsed.branch_prefixes)
    assert "only these independent steps start with `####`" in FORMAT_INSTRUCTION_EN.lower()


def test_a_format_instruction_is_appended_or_wraps_the_task_text():
    row = make_retrieval_rows(4, 1, seed=1)[0]
    text = task_text("retrieval", row)
    assert build_prompt("retrieval", row) == f"{text}\n{FORMAT_INSTRUCTION_EN}"
    assert build_prompt("retrieval", row, "Use ####T: blocks.") == f"{text}\nUse ####T: blocks."
    assert build_prompt("retrieval", row, "Task:\n{task}\nFormat: {x}") == f"Task:\n{text}\nFormat: {{x}}"
    zh_row = {"task": "规划一次旅行。"}
    assert build_prompt("planning", zh_row, "Steps as ####T:") == f"{task_text('planning', zh_row)}\nSteps as ####T:"


def test_read_format_prompt_checks_the_file(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffSteps as `####Title:`, then `####%%%%`.\n\n".encode("utf-8"))
    assert read_format_prompt(good) == "Steps as `####Title:`, then `####%%%%`."
    bad = {
        "missing.txt": (None, "no such file"),
        "empty.txt": (b" \n\t\n", "the file is empty"),
        "latin1.txt": ("Schritte für ####".encode("latin-1"), "not UTF-8 text (invalid byte at offset 10)"),
        "two.txt": (b"{task}\nand again {task}", "2 {task} placeholders; at most one is allowed"),
    }
    for name, (content, message) in bad.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(FormatPromptError) as error:
            read_format_prompt(path)
        assert str(error.value) == f"{path}: {message}"


def test_format_prompt_digest_tells_instructions_apart():
    assert format_prompt_digest(None) == format_prompt_digest(f"{FORMAT_INSTRUCTION_EN}\n{FORMAT_INSTRUCTION_ZH}")
    assert format_prompt_digest("a") != format_prompt_digest("b") != format_prompt_digest(None)
    assert len(format_prompt_digest("a")) == 64


def test_unknown_task_is_rejected():
    with pytest.raises(KeyError, match="unknown task 'summarize'"):
        build_prompt("summarize", {"prompt": "x"})


# --- reference formats load --------------------------------------------------------------------------------------


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_longbench_2wikimqa_row_loads_unchanged(tmp_path):
    row = {
        "input": "Who was born first, Ann Lee or Bo Chen?",
        "context": "Passage 1:\nAnn Lee\nAnn Lee (born 1901).\nPassage 2:\nBo Chen\nBo Chen (born 1899).",
        "answers": ["Bo Chen"],
        "length": 12,
        "dataset": "2wikimqa",
        "language": "en",
        "all_classes": None,
        "_id": "0f" * 24,
    }
    rows = load_dataset("multi-document-qa", _write(tmp_path / "2wikimqa.jsonl", [json.dumps(row)]))
    assert rows == [row]
    prompt = build_prompt("multi-document-qa", row)
    assert prompt.startswith("The following passages are given.\n\nPassage 1:\nAnn Lee\n")
    assert f"Question: {row['input']}\n\n{MULTI_DOC_QA_INSTRUCTION}" in prompt


def test_reference_retrieval_and_planning_rows_load(tmp_path):
    retrieval = {"prompt": "Which student ...?", "gold_keys": "Ann", "gold_values": "3.10"}
    planning = {"task": "Plan a move.", "answer": "Housing: ..."}
    assert load_dataset("retrieval", _write(tmp_path / "r.jsonl", [json.dumps(retrieval)])) == [retrieval]
    assert load_dataset("planning", _write(tmp_path / "p.jsonl", [json.dumps(planning), ""])) == [planning]
    (tmp_path / "p.json").write_text(json.dumps([planning]))
    assert load_dataset("planning", tmp_path / "p.json") == [planning]


@pytest.mark.parametrize("task", ["retrieval", "multi-document-qa", "planning"])
def test_default_data_files_load(task):
    assert len(load_dataset(task, default_data_path(task))) >= 30


def test_bad_datasets_name_file_and_line(tmp_path):
    bad_json = _write(tmp_path / "bad.jsonl", ['{"prompt": "a"}', '{"prompt": '])
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: invalid JSON"):
        load_dataset("retrieval", bad_json)
    missing = _write(tmp_path / "missing.jsonl", ['{"prompt": "a"}', '{"question": "b"}'])
    with pytest.raises(DatasetError, match=r"missing\.jsonl:2: row has no 'prompt' field"):
        load_dataset("retrieval", missing)
    with pytest.raises(DatasetError, match=r"row has no 'context' field"):
        load_dataset("multi-document-qa", _write(tmp_path / "q.jsonl", ['{"input": "q"}']))
    with pytest.raises(DatasetError, match=r"field 'task' must be a non-empty string"):
        load_dataset("planning", _write(tmp_path / "e.jsonl", ['{"task": "  "}']))
    with pytest.raises(DatasetError, match=r"expected a JSON object"):
        load_dataset("planning", _write(tmp_path / "l.jsonl", ['["task"]']))
    with pytest.raises(DatasetError, match="has no rows"):
        load_dataset("planning", _write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DatasetError, match="cannot read dataset"):
        load_dataset("planning", tmp_path / "nope.jsonl")
