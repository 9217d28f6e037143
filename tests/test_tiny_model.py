"""The embedded default model (models/tiny-qwen2-retrieval) and its training script."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "tiny-qwen2-retrieval"
SCRIPT = REPO / "scripts" / "train_tiny_model.py"
MAX_DIR_BYTES = 10 * 1024 * 1024
MAX_PARAMETERS = 3_000_000
MARKERS = ("####", "%%%%", "......")


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tiny_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


# --- the committed model ----------------------------------------------------------------------------------------


def test_loads_as_stock_qwen2_with_gqa_and_rope(model):
    from transformers import Qwen2ForCausalLM

    assert type(model) is Qwen2ForCausalLM
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.max_position_embeddings >= 2048  # a 10-student prompt fits
    assert "rotary" in type(model.model.rotary_emb).__name__.lower()


def test_size_limits(model):
    files = [p for p in MODEL_DIR.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) < MAX_DIR_BYTES
    assert (MODEL_DIR / "model.safetensors").is_file()
    assert not list(MODEL_DIR.glob("*.bin"))
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMETERS


def test_markers_and_chat_tokens_are_single_tokens(tokenizer):
    for text in MARKERS + ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "\n", ":"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, tokenizer.convert_ids_to_tokens(ids))
    # Markers are ordinary (non-special) tokens: a decoded answer keeps them.
    ids = tokenizer.encode("####Ava Chen: GPA 3.45\n####%%%%", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "####Ava Chen: GPA 3.45\n####%%%%"


def test_title_ends_in_a_lone_colon_and_space_joins_the_next_word(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("####Ava Chen: GPA 3.45", add_special_tokens=False))
    assert tokens[0] == "####" and ":" in tokens
    after_colon = tokens[tokens.index(":") + 1]
    assert after_colon.startswith("Ġ")  # ': ' is ':' then ' GPA', never one ': ' token


def test_eos_pad_and_generation_config(model, tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == im_end
    assert model.generation_config.eos_token_id == im_end


def test_chat_template_is_qwen25_style(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which student?"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nWhich student?<|im_end|>\n<|im_start|>assistant\n"


def test_gpa_numbers_are_single_tokens(tokenizer):
    """Every GPA the generator can write is one token, also inside a resume line, and decodes back unchanged."""
    script = _load_script()
    for text in script.gpa_token_texts():
        assert len(tokenizer.encode(text, add_special_tokens=False)) == 1, text
    line = "Ava Chen: age 21, MIT, GPA 3.59, likes chess and jazz."
    ids = tokenizer.encode(line, add_special_tokens=False)
    assert " 3.59" in tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids) == line


def test_reads_the_prompt_on_a_held_out_row(model, tokenizer):
    """Stage 1 titles the steps with the students' names in prompt order, and every branch states that student's
    GPA, copied from the prompt (the row's seed was never trained on)."""
    from parallel_decoding import parallel_decode
    from parallel_decoding.tasks import build_prompt, load_dataset
    from parallel_decoding.tasks.retrieval import format_gpa

    row = load_dataset("retrieval", REPO / "data" / "retrieval_4.jsonl")[0]
    prompt = build_prompt("retrieval", row, _model_format_prompt())
    out = parallel_decode(model, tokenizer, prompt, max_new_tokens=200)
    assert out["fallback"] is None
    assert [b["title"] for b in out["branches"]] == [s["name"] for s in row["students"]]
    low, high = row["gpa_range"]
    for branch, student in zip(out["branches"], row["students"]):
        verdict = "inside" if low <= student["gpa"] <= high else "outside"
        assert branch["text"].startswith(f" GPA {format_gpa(student['gpa'])} {verdict} the range."), branch
    assert "####%%%%" in out["response"]
    assert out["response"].rstrip().endswith(f"Final answer: {row['gold_keys']}")


def _model_format_prompt() -> str:
    from parallel_decoding.tasks import MODEL_FORMAT_PROMPT_FILE, read_format_prompt

    return read_format_prompt(MODEL_DIR / MODEL_FORMAT_PROMPT_FILE)


def test_the_model_keeps_the_format_instruction_it_was_trained_with(script):
    """format_prompt.txt beside the weights is the training script's instruction (the prompt is part of the model)."""
    assert _model_format_prompt() == script.FORMAT_INSTRUCTION


def test_committed_weights_have_the_loss_the_training_log_reports(script, model, tokenizer):
    """The log describes these weights: on fresh rows of the training distribution (a data seed neither trained on
    nor held out) the committed model's tree loss is near the logged final loss, far below the logged first loss."""
    log = json.loads((MODEL_DIR / "train_log.json").read_text())
    assert log["parameters"] == sum(p.numel() for p in model.parameters())
    rows = script.make_rows(8, 0, 99)
    batch = script.collate([script.build_example(tokenizer, row) for row in rows], tokenizer.pad_token_id)
    with torch.no_grad():
        loss = script.tree_loss(model, batch).item()
    assert loss < 3 * max(log["loss"][-50:]) < log["loss"][0] / 10


def _verdicts(script, model, tokenizer, rows: list) -> list:
    """(residual verdict, logit gap " inside" - " outside", truth) at every step's GPA, teacher-forced on the full
    answer."""
    layout = script.ResidualLayout.for_width(model.config.hidden_size)
    inside, outside = (tokenizer.convert_tokens_to_ids(t) for t in (" inside", " outside"))
    found = []
    for row in rows:
        example = script.build_example(tokenizer, row)
        index = [i for i, s in enumerate(example.segment) if s <= 1]  # the prompt and the full answer
        ids = [example.input_ids[i] for i in index]
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        for i in range(len(ids) - 1):
            if ids[i + 1] in (inside, outside):
                verdict = out.hidden_states[2][0, i, layout.dim("verdict")].item()
                gap = (out.logits[0, i, inside] - out.logits[0, i, outside]).item()
                found.append((verdict, gap, ids[i + 1] == inside))
    return found


def test_committed_model_judges_every_held_out_step_right(script, model, tokenizer):
    """Teacher-forced on held-out rows, every step's verdict (the token after its GPA) is the right one."""
    from parallel_decoding.tasks import load_dataset

    rows = load_dataset("retrieval", REPO / "data" / "retrieval_10.jsonl")[:10]
    found = _verdicts(script, model, tokenizer, rows)
    assert len(found) == 100
    assert all((gap > 0) == truth for _, gap, truth in found)


def test_committed_model_keeps_the_hand_set_range_check(script, model, tokenizer):
    """Training restored the range check's entries after every step: the committed weights hold exactly what
    make_model sets (seeded as the script seeds it), up to the bfloat16 the weights are stored in."""
    torch.manual_seed(0)
    fresh = script.make_model(tokenizer, script.ModelSize())
    committed = dict(model.named_parameters())
    checked = 0
    for param, mask in script.frozen_entries(fresh):
        name = next(n for n, p in fresh.named_parameters() if p is param)
        expected = param.detach().to(torch.bfloat16).float()[mask]
        torch.testing.assert_close(committed[name].detach()[mask], expected, rtol=0, atol=0, msg=name)
        checked += int(mask.sum())
    assert checked > 10_000


def _row_with_gpas(gpas: list, gpa_range: list) -> dict:
    """A retrieval row whose students have exactly these GPAs (names from the generator's lists)."""
    from parallel_decoding.tasks.retrieval import FIRST_NAMES, LAST_NAMES, question_text

    students = [
        {
            "name": f"{FIRST_NAMES[i]} {LAST_NAMES[i]}",
            "age": 20 + i,
            "university": "MIT",
            "gpa": g,
            "interests": ["chess", "jazz"],
            "intro": "I enjoy solving puzzles.",
        }
        for i, g in enumerate(gpas)
    ]
    return {
        "prompt": question_text(students, gpa_range),
        "students": students,
        "gpa_range": gpa_range,
        "gold_keys": ", ".join(s["name"] for s in students if gpa_range[0] <= s["gpa"] <= gpa_range[1]),
        "num_students": len(students),
    }


def test_range_check_is_exact_at_the_ends_before_any_training(script, tokenizer):
    """Untrained, the hand-set range check reads both ends of the asked range and judges GPAs one hundredth either
    side of each end right: inclusive ends, exact in hundredths, anywhere in a 10-student prompt."""
    torch.manual_seed(0)
    model = script.make_model(tokenizer, script.ModelSize()).eval()
    rows = [
        _row_with_gpas([3.49, 3.50, 3.61, 3.62], [3.50, 3.61]),
        _row_with_gpas([1.99, 2.00, 2.01, 2.02, 2.10, 2.11, 3.99, 4.00, 2.05, 2.06], [2.01, 2.01]),
        _row_with_gpas([4.00, 3.99, 3.98, 2.00], [3.99, 3.99]),
    ]
    found = _verdicts(script, model, tokenizer, rows)
    assert len(found) == 18
    for verdict, _, truth in found:
        assert verdict == pytest.approx(8.0 if truth else -8.0, abs=1e-3)


# --- the training script ----------------------------------------------------------------------------------------


def test_tree_example_matches_the_engine_layout(script, tokenizer):
    """The packed tree: shared prefix + full answer equals the plain chat encoding; every other segment starts at
    the prefix's length, as the engine places branches."""
    from parallel_decoding.engine.decode import chat_prompt_ids
    from parallel_decoding.tasks import build_prompt

    row = script.make_rows(1, 0, 7)[0]
    ex = script.build_example(tokenizer, row)
    prefix_len = ex.segment.count(0)
    sequential = chat_prompt_ids(tokenizer, build_prompt("retrieval", row, script.FORMAT_INSTRUCTION))
    sequential += tokenizer.encode(script.answer_full(row), add_special_tokens=False)
    sequential.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert [t for t, s in zip(ex.input_ids, ex.segment) if s in (0, 1)] == sequential
    num_segments = max(ex.segment)
    assert num_segments == 2 + len(row["students"]) - 1  # full, skeleton, one branch per student but the first
    for k in range(1, num_segments + 1):
        positions = [p for p, s in zip(ex.position_ids, ex.segment) if s == k]
        assert positions == list(range(prefix_len, prefix_len + len(positions)))
    skeleton = tokenizer.decode([t for t, s in zip(ex.input_ids, ex.segment) if s == 2])
    assert skeleton == "".join(f"####{s['name']}:......\n" for s in row["students"]) + "####%%%%"
    branch = tokenizer.decode([t for t, s in zip(ex.input_ids, ex.segment) if s == 3])
    assert branch.startswith(f"####{row['students'][1]['name']}:") and branch.endswith(".\n####")


def test_tree_loss_equals_each_segment_decoded_alone(script, tokenizer):
    """One packed forward pass gives the same loss as every segment run alone after the prefix (plain causal)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = script.make_model(tokenizer, script.TINY_SIZE).double().eval()  # float64: any gap is a layout bug
    model.set_attn_implementation("eager")
    with torch.no_grad():  # random init attends almost uniformly; sharper weights make a layout bug show
        for p in model.parameters():
            p.mul_(4.0)
    examples = [script.build_example(tokenizer, r) for r in script.make_rows(2, 0, 11)]
    with torch.no_grad():
        tree = script.tree_loss(model, script.collate(examples, tokenizer.pad_token_id, torch.float64))
        losses = []
        for ex in examples:
            prefix = [i for i, s in enumerate(ex.segment) if s == 0]
            groups = [prefix] + [
                prefix + [i for i, s in enumerate(ex.segment) if s == k] for k in range(1, max(ex.segment) + 1)
            ]
            for g, index in enumerate(groups):
                logits = model(input_ids=torch.tensor([[ex.input_ids[i] for i in index]])).logits[0]
                for j, i in enumerate(index):
                    if ex.labels[i] != script.IGNORE and (g == 0 or ex.segment[i] != 0):
                        losses.append(F.cross_entropy(logits[j - 1].float(), torch.tensor(ex.labels[i])))
        reference = torch.stack(losses).mean()
    torch.testing.assert_close(tree, reference, rtol=1e-5, atol=1e-5)


def test_skeleton_forced_tokens_carry_no_loss(script, tokenizer):
    ex = script.build_example(tokenizer, script.make_rows(1, 0, 5)[0])
    forced = {tokenizer.convert_tokens_to_ids(t) for t in ("......", "Ċ")}
    skeleton_labels = [lab for lab, s in zip(ex.labels, ex.segment) if s == 2]
    assert not forced & set(skeleton_labels)
    assert tokenizer.convert_tokens_to_ids("%%%%") in skeleton_labels


def _fresh_model(script, tokenizer, structured_init: bool = True):
    torch.manual_seed(0)
    model = script.make_model(tokenizer, script.ModelSize(), structured_init=structured_init).eval()
    model.set_attn_implementation("eager")  # attention weights are returned by eager attention only
    return model


def _copy_accuracy(model, vocab_size: int, length: int = 60) -> float:
    gen = torch.Generator().manual_seed(0)
    first = torch.randint(10, vocab_size, (8, length), generator=gen)  # (B, L)
    ids = torch.cat([torch.zeros(8, 1, dtype=torch.long), first, first], dim=1)  # (B, 1 + 2L)
    with torch.no_grad():
        predicted = model(ids).logits[:, length + 1 : -1].argmax(-1)  # (B, L - 1): predictions inside the copy
    return (predicted == ids[:, length + 2 :]).float().mean().item()


def test_structured_init_copies_repeated_sequences(script, tokenizer):
    """Before any training, layers 0-1 form an induction circuit: in a random token sequence shown twice, half of
    the second copy or more is predicted from the first. A plain random start predicts next to none of it."""
    structured = _copy_accuracy(_fresh_model(script, tokenizer), len(tokenizer))
    plain = _copy_accuracy(_fresh_model(script, tokenizer, structured_init=False), len(tokenizer))
    assert structured > 0.5 and plain < 0.05, (structured, plain)


def test_structured_init_heads_on_a_prompt(script, tokenizer):
    """Layer 0 starts with a previous-token head (query head 2) and a head that reads the current line's name
    (query head 0): at every GPA of a resume line it attends to that line's first or last name."""
    from parallel_decoding.engine.decode import chat_prompt_ids
    from parallel_decoding.tasks import build_prompt

    model = _fresh_model(script, tokenizer)
    row = script.make_rows(1, 0, 3)[0]
    ids = chat_prompt_ids(tokenizer, build_prompt("retrieval", row, script.FORMAT_INSTRUCTION))
    with torch.no_grad():
        attn = model(torch.tensor([ids]), output_attentions=True).attentions[0][0]  # (H, T, T)
    positions = torch.arange(1, len(ids))
    assert (attn[2, positions].argmax(-1) == positions - 1).float().mean() > 0.95
    tokens = tokenizer.convert_ids_to_tokens(ids)
    for student in row["students"]:
        gpa_pos = tokens.index(" " + script.format_gpa(student["gpa"]))
        looked_at = tokenizer.decode([ids[int(attn[0, gpa_pos].argmax())]]).strip()
        assert looked_at in student["name"].split(), (student["name"], looked_at)


def test_structured_init_refuses_an_unsupported_shape(script, tokenizer):
    size = script.ModelSize(
        hidden_size=100, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    with pytest.raises(ValueError, match="hidden_size divisible by 6"):
        script.make_model(tokenizer, size)
    size = script.ModelSize(
        hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
    )
    with pytest.raises(ValueError, match="at least 2 layers"):
        script.make_model(tokenizer, size)


def _smoke_run(out: Path) -> dict:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--tiny",
        "--steps",
        "3",
        "--batch_size",
        "2",
        "--log_every",
        "1",
        "--output_dir",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    return json.loads((out / "train_log.json").read_text())


def test_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    first, second = _smoke_run(tmp_path / "a"), _smoke_run(tmp_path / "b")
    assert len(first["loss"]) == 3
    assert first["loss"] == second["loss"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0
    saved_instruction = (tmp_path / "a" / "format_prompt.txt").read_text(encoding="utf-8")
    assert saved_instruction == _load_script().FORMAT_INSTRUCTION + "\n"


def test_training_rows_never_repeat_a_held_out_prompt(script):
    args = script.parse_args([])
    num_rows = args.steps * args.batch_size
    rows = script.make_rows(num_rows, round(num_rows * args.frac_10), args.data_seed)
    held_out = script.held_out_prompts()
    assert len(held_out) == 100
    assert not held_out & {row["prompt"] for row in rows}


def test_refuses_the_held_out_seed(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--data_seed", "1234", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--data_seed 1234 is the held-out evaluation seed" in proc.stderr
    assert not any(tmp_path.iterdir())
