"""flash_attn_branch kernel vs. its float64 reference, on the CPU through the Triton interpreter."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flash-attention"))  # the working tree's copy

from flash_attn_branch import (  # noqa: E402
    branch_ids_for_engine_layout,
    branch_ids_from_reference_layout,
    branch_visibility_mask,
    flash_attn_varlen_func,
    flash_attn_varlen_reference,
)
from flash_attn_branch.interface import LaunchConfig, _flash_attn_varlen_forward, check_varlen_args  # noqa: E402

# One unit in the last place at 1.0, per dtype: the floor of the tolerance (output rounding).
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
TOLERANCE_FACTOR = 2.0  # the kernel may be this many times worse than eager attention computed in the dtype


def _cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _random_branch_layout(q_lens, k_lens, num_branches, generator):
    """Per sequence: a shared prefix, then keys of random branches; queries take the branch of their own key
    position (the engine's situation), except the first query of each sequence, whose branch owns no key: it sees
    only the shared prefix."""
    q_ids, k_ids = [], []
    for q_len, k_len in zip(q_lens, k_lens):
        prefix = int(torch.randint(0, k_len + 1, (1,), generator=generator))
        k_branch = torch.randint(0, num_branches, (k_len,), generator=generator, dtype=torch.int32)
        k_branch[:prefix] = -1
        q_branch = torch.randint(0, num_branches, (q_len,), generator=generator, dtype=torch.int32)
        own = torch.arange(q_len) + (k_len - q_len)  # bottom-right: query i sits at key k_len - q_len + i
        has_own = (own >= 0) & (own < k_len)
        q_branch[has_own] = torch.where(k_branch[own[has_own]] >= 0, k_branch[own[has_own]], q_branch[has_own])
        if q_len:
            q_branch[0] = num_branches  # a branch with no key: only the shared prefix is visible
        q_ids.append(q_branch)
        k_ids.append(k_branch)
    return torch.cat(q_ids), torch.cat(k_ids)


def _make_inputs(q_lens, k_lens, num_heads, num_kv_heads, head_dim, dtype, seed, branches=None):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=generator).to(dtype)
    k = torch.randn(sum(k_lens), num_kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(sum(k_lens), num_kv_heads, head_dim, generator=generator).to(dtype)
    args = dict(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=_cu_seqlens(q_lens),
        cu_seqlens_k=_cu_seqlens(k_lens),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(k_lens),
    )
    if branches is not None:
        args["q_branch"], args["k_branch"] = _random_branch_layout(q_lens, k_lens, branches, generator)
    return args


def _assert_matches_reference(out, args, causal=True):
    """|kernel - ref64| <= TOLERANCE_FACTOR * |eager attention in the dtype - ref64| + one ulp of the output."""
    dtype = args["q"].dtype
    exact = flash_attn_varlen_reference(**args, causal=causal, out_dtype=torch.float64)
    eager = flash_attn_varlen_reference(**args, causal=causal, compute_dtype=dtype)
    assert out.dtype == dtype and out.shape == args["q"].shape
    kernel_err = (out.double() - exact).abs().max().item()
    eager_err = (eager.double() - exact).abs().max().item()
    tolerance = TOLERANCE_FACTOR * eager_err + ULP[dtype] * max(1.0, exact.abs().max().item())
    assert kernel_err <= tolerance, f"kernel error {kernel_err:.3g} > {tolerance:.3g} (eager {dtype}: {eager_err:.3g})"


# (q_lens, k_lens, Hq, Hkv, head_dim, dtype, branches, launch config or None for the default)
CASES = [
    ([1, 7, 30], [40, 130, 300], 4, 4, 64, torch.float32, None, None),  # plain causal, GQA 1
    ([5, 17], [60, 17], 8, 4, 32, torch.float32, 3, None),  # GQA 2, a sequence with Lq == Lk (prefill)
    ([16, 3], [250, 90], 8, 2, 128, torch.float32, 4, LaunchConfig(16, 16, 1)),  # GQA 4, many small tiles/blocks
    ([8, 12], [200, 64], 4, 1, 64, torch.float16, 4, None),
    ([9, 2], [120, 33], 6, 2, 80, torch.bfloat16, 3, None),  # head dim 80 (BLOCK_D 128, masked columns)
    ([4], [70], 2, 1, 96, torch.float16, 2, LaunchConfig(16, 16, 1)),
    ([3, 6], [40, 50], 2, 2, 256, torch.bfloat16, 2, None),
    ([12, 5], [180, 31], 4, 2, 64, torch.float32, 3, LaunchConfig(16, 16, 4)),  # split-KV + combine
]


@pytest.mark.parametrize("q_lens,k_lens,num_heads,num_kv_heads,head_dim,dtype,branches,config", CASES)
def test_matches_reference(q_lens, k_lens, num_heads, num_kv_heads, head_dim, dtype, branches, config):
    args = _make_inputs(
        q_lens, k_lens, num_heads, num_kv_heads, head_dim, dtype, seed=len(q_lens) * head_dim, branches=branches
    )
    out = _flash_attn_varlen_forward(**args, config=config)
    _assert_matches_reference(out, args)


@pytest.mark.parametrize("config", [None, LaunchConfig(16, 16, 1), LaunchConfig(16, 16, 4)])
def test_the_kernels_inline_rule_is_the_one_definition_of_visibility(config):
    """The kernel keeps the visibility rule inline (Triton cannot call torch); its output shows which keys each
    query saw. With zero queries every visible key gets the same weight, and with one-hot values (value j is the
    unit vector j) the output row of a query is its weights over the keys: 1 / (keys seen) where it sees a key, 0
    elsewhere. That pattern must be ``visibility.sees`` on ragged sequences of random branch layouts (a branch with
    no key, a sequence with more queries than keys, split key ranges)."""
    from flash_attn_branch.visibility import sees

    q_lens, k_lens, heads = [1, 6, 9, 4], [40, 23, 9, 2], 2
    generator = torch.Generator().manual_seed(3)
    q_branch, k_branch = _random_branch_layout(q_lens, k_lens, 3, generator)
    width = max(k_lens)
    q = torch.zeros(sum(q_lens), heads, width)
    k = torch.randn(sum(k_lens), 1, width, generator=generator)
    v = torch.cat([torch.eye(width)[:n] for n in k_lens])[:, None, :]  # (K, 1, width): key j of its sequence -> e_j
    out = _flash_attn_varlen_forward(
        q, k, v, _cu_seqlens(q_lens), _cu_seqlens(k_lens), max(q_lens), max(k_lens),
        q_branch=q_branch, k_branch=k_branch, config=config,
    )  # fmt: skip
    q_start = k_start = 0
    for q_len, k_len in zip(q_lens, k_lens):
        query_position = torch.arange(q_len) + (k_len - q_len)  # bottom-right aligned
        visible = sees(
            query_position[:, None],
            q_branch[q_start : q_start + q_len, None],
            torch.arange(k_len)[None, :],
            k_branch[None, k_start : k_start + k_len],
        )  # (Lq, Lk)
        weights = visible / visible.sum(dim=1, keepdim=True).clamp(min=1)
        for head in range(heads):
            torch.testing.assert_close(out[q_start : q_start + q_len, head, :k_len], weights, atol=1e-6, rtol=0)
        q_start, k_start = q_start + q_len, k_start + k_len


def test_public_function_non_causal_and_custom_scale():
    args = _make_inputs([6, 11], [20, 45], 4, 2, 32, torch.float32, seed=3, branches=3)
    out = flash_attn_varlen_func(**args, softmax_scale=0.3, causal=False)
    exact = flash_attn_varlen_reference(**args, softmax_scale=0.3, causal=False, out_dtype=torch.float64)
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)


def test_split_kv_matches_unsplit():
    args = _make_inputs([10, 1], [150, 77], 4, 2, 32, torch.float16, seed=5, branches=3)
    whole = _flash_attn_varlen_forward(**args, config=LaunchConfig(16, 16, 1))
    split = _flash_attn_varlen_forward(**args, config=LaunchConfig(16, 16, 5))
    torch.testing.assert_close(split, whole, atol=2e-3, rtol=0)
    _assert_matches_reference(split, args)


def test_fewer_keys_than_queries_and_empty_sequences():
    """Bottom-right alignment: with Lk < Lq the first Lq - Lk queries see no key and output 0 (as FlashAttention-2)."""
    args = _make_inputs([9, 0, 4], [5, 3, 0], 2, 1, 32, torch.float32, seed=7)
    out = flash_attn_varlen_func(**args)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))  # queries 0..3 of sequence 0
    assert torch.equal(out[9:], torch.zeros_like(out[9:]))  # sequence 2 has no keys
    _assert_matches_reference(out, args)


def test_strided_views_from_bhtd_layout():
    """The HF adapter passes transposed views (B, H, T, D) -> (T, H, D); only the last dim must be contiguous."""
    generator = torch.Generator().manual_seed(11)
    query = torch.randn(1, 4, 13, 32, generator=generator)  # (B, Hq, Tq, D)
    key = torch.randn(1, 2, 50, 32, generator=generator)  # (B, Hkv, Tk, D)
    value = torch.randn(1, 2, 50, 32, generator=generator)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D) views, not contiguous
    assert not q.is_contiguous()
    args = dict(
        q=q, k=k, v=v, cu_seqlens_q=_cu_seqlens([13]), cu_seqlens_k=_cu_seqlens([50]), max_seqlen_q=13, max_seqlen_k=50
    )
    out = flash_attn_varlen_func(**args)
    expected = flash_attn_varlen_func(**{**args, "q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous()})
    assert torch.equal(out, expected)
    _assert_matches_reference(out, args)


def test_engine_decode_step_with_layout_helper():
    """One decode step of the engine's layout: each query sees the prefix, its own title and its own tokens."""
    k_branch = branch_ids_for_engine_layout(20, [4, 2, 5], [[0, 1, 2], [0, 2], [0, 1, 2]])
    q_branch = torch.tensor([0, 1, 2], dtype=torch.int32)  # the last step's three tokens
    total = k_branch.numel()
    generator = torch.Generator().manual_seed(13)
    args = dict(
        q=torch.randn(3, 4, 64, generator=generator),
        k=torch.randn(total, 2, 64, generator=generator),
        v=torch.randn(total, 2, 64, generator=generator),
        cu_seqlens_q=_cu_seqlens([3]),
        cu_seqlens_k=_cu_seqlens([total]),
        max_seqlen_q=3,
        max_seqlen_k=total,
        q_branch=q_branch,
        k_branch=k_branch,
    )
    out = flash_attn_varlen_func(**args)
    _assert_matches_reference(out, args)
    visible = branch_visibility_mask(3, total, True, q_branch, k_branch)
    assert visible[1].sum().item() == 20 + 2 + 2  # prefix, title of branch 1, its tokens of steps 0 and 2


def test_invisible_key_blocks_are_skipped():
    """Branch-only key blocks that no query of the tile can see are never loaded: NaN values there stay harmless
    (a visited block would spread NaN through P @ V even where P is 0)."""
    block = 16
    k_branch = branch_ids_for_engine_layout(block, [2 * block, block, block])  # prefix, then 3 title blocks
    total = k_branch.numel()
    q_branch = torch.zeros(block, dtype=torch.int32)  # one tile of branch-0 queries (GQA 1: rows are queries)
    generator = torch.Generator().manual_seed(17)
    v = torch.randn(total, 1, 32, generator=generator)
    v_poisoned = v.clone()
    v_poisoned[3 * block :] = float("nan")  # the blocks of branches 1 and 2
    args = dict(
        q=torch.randn(block, 1, 32, generator=generator),
        k=torch.randn(total, 1, 32, generator=generator),
        cu_seqlens_q=_cu_seqlens([block]),
        cu_seqlens_k=_cu_seqlens([total]),
        max_seqlen_q=block,
        max_seqlen_k=total,
        q_branch=q_branch,
        k_branch=k_branch,
        causal=False,
    )
    config = LaunchConfig(block, block, 1)
    out = _flash_attn_varlen_forward(**args, v=v_poisoned, config=config)
    assert torch.isfinite(out).all()
    assert torch.equal(out, _flash_attn_varlen_forward(**args, v=v, config=config))
    visited = _flash_attn_varlen_forward(**args, v=v_poisoned, config=config, skip_branch_blocks=False)
    assert torch.isnan(visited).all()  # the same call without skipping does read them
    torch.testing.assert_close(
        out.double(), flash_attn_varlen_reference(**args, v=v, out_dtype=torch.float64), atol=1e-5, rtol=1e-5
    )


def test_layout_helpers():
    assert branch_ids_from_reference_layout(8, 3, 2).tolist() == [-1, -1, -1, 0, 1, 0, 1, 0]
    assert branch_ids_from_reference_layout(8, 3, 2).dtype == torch.int32
    ids = branch_ids_for_engine_layout(2, [2, 1, 3], [[0, 1, 2], [0, 2], [2]])
    assert ids.tolist() == [-1, -1, 0, 0, 1, 2, 2, 2, 0, 1, 2, 0, 2, 2]
    with pytest.raises(ValueError, match="num_para must be >= 1"):
        branch_ids_from_reference_layout(8, 3, 0)
    with pytest.raises(ValueError, match="para_begin_position must be in"):
        branch_ids_from_reference_layout(8, 9, 2)
    with pytest.raises(ValueError, match=r"step 1 must list distinct branch ids"):
        branch_ids_for_engine_layout(2, [2, 1], [[0, 1], [1, 0]])


def test_reference_layout_matches_explicit_mask():
    """The reference's interleaved layout: each branch token sees the prefix and earlier tokens of its branch."""
    k_branch = branch_ids_from_reference_layout(11, 5, 3)
    visible = branch_visibility_mask(11, 11, True, k_branch, k_branch)
    expected = torch.tensor(
        [[j <= i and (j < 5 or (i >= 5 and (j - 5) % 3 == (i - 5) % 3)) for j in range(11)] for i in range(11)]
    )
    assert torch.equal(visible, expected)


def _valid_args():
    return _make_inputs([3, 4], [10, 12], 4, 2, 32, torch.float16, seed=0, branches=2)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(q=a["q"][:, :, None]), r"q must be 3-D"),
        (lambda a: a.update(k=a["k"].float()), r"q, k, v must share one dtype"),
        (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), r"q.dtype must be float16"),
        (lambda a: a.update(k=a["k"][:, :, :16].contiguous(), v=a["v"][:, :, :16].contiguous()), r"head dims differ"),
        (lambda a: a.update(v=a["v"][:-1]), r"k and v must have the same shape"),
        (
            lambda a: a.update(k=a["k"][:, :1].expand(-1, 3, -1), v=a["v"][:, :1].expand(-1, 3, -1)),
            r"query heads \(4\) must be a multiple of key/value heads \(3\)",
        ),
        (
            lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)),
            r"q must be contiguous in its last",
        ),
        (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), r"cu_seqlens_q must be int32"),
        (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][:2]), r"describe different batch sizes"),
        (
            lambda a: a.update(cu_seqlens_k=torch.tensor([0, 10, 21], dtype=torch.int32)),
            r"cu_seqlens_k must rise from 0",
        ),
        (lambda a: a.update(max_seqlen_k=11), r"a sequence has 12 tokens but max_seqlen_k is 11"),
        (lambda a: a.update(max_seqlen_q=2.5), r"max_seqlen_q must be a non-negative int"),
        (lambda a: a.pop("k_branch"), r"pass both q_branch and k_branch, or neither"),
        (lambda a: a.update(k_branch=a["k_branch"].long()), r"k_branch must be int32"),
        (lambda a: a.update(q_branch=a["q_branch"][:-1]), r"q_branch must have one id per token \(7\)"),
        (lambda a: a.update(q_branch=a["q_branch"].tolist()), r"q_branch must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise(change, match):
    args = _valid_args()
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attn_varlen_func(**args)


def test_cpu_tensors_need_the_interpreter():
    args = _valid_args()
    with pytest.raises(ValueError, match=r"the Triton kernel needs CUDA tensors \(set TRITON_INTERPRET=1"):
        check_varlen_args(
            *(
                args[n]
                for n in (
                    "q",
                    "k",
                    "v",
                    "cu_seqlens_q",
                    "cu_seqlens_k",
                    "max_seqlen_q",
                    "max_seqlen_k",
                    "q_branch",
                    "k_branch",
                )
            ),
            interpreted=False,
        )


@pytest.mark.parametrize(
    "moved, where", [("k", "k on meta"), ("k_branch", "k_branch on meta"), ("cu_seqlens_q", "cu_seqlens_q on meta")]
)
def test_tensors_on_two_devices_raise_one_clear_line(moved, where):
    """Under --device_map a layer's inputs could straddle two GPUs; the wrapper names each tensor off q's device
    before it reads any of them (the meta device stands in for a second GPU)."""
    args = _valid_args()
    args[moved] = args[moved].to("meta")
    with pytest.raises(ValueError) as error:
        flash_attn_varlen_func(**args)
    message = str(error.value)
    assert message.startswith(f"flash_attn_varlen_func: all tensors must be on one device, but q is on cpu and {where}")
    assert "\n" not in message


def test_launch_device_makes_the_inputs_cuda_device_current(monkeypatch):
    """Triton launches on the current CUDA device: the guard enters torch.cuda.device(<the inputs' device>), and
    does nothing for CPU tensors (no CUDA call at all)."""
    import contextlib

    from flash_attn_branch import interface

    entered = []

    @contextlib.contextmanager
    def spy(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", spy)
    with interface.launch_device(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with interface.launch_device(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_launch_runs_under_the_guard_of_q_device(monkeypatch):
    """Both kernels (split-KV forward and combine) launch inside one guard of q's device."""
    import contextlib

    from flash_attn_branch import _kernels, interface

    events = []

    @contextlib.contextmanager
    def guard(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                events.append(("launch", self.name))
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(interface, "launch_device", guard)
    for name in ("_branch_attn_fwd_kernel", "_combine_splits_kernel"):
        monkeypatch.setattr(_kernels, name, Recorder(name, getattr(_kernels, name)))
    args = _make_inputs([2], [64], 4, 2, 32, torch.float32, seed=3, branches=2)
    out = _flash_attn_varlen_forward(**args, config=LaunchConfig(block_m=16, block_n=16, num_splits=2))
    assert events == [
        ("enter", torch.device("cpu")),
        ("launch", "_branch_attn_fwd_kernel"),
        ("launch", "_combine_splits_kernel"),
        ("exit", torch.device("cpu")),
    ]
    ref = flash_attn_varlen_reference(**args)
    assert torch.allclose(out, ref, atol=1e-5)


def test_bench_code_path_on_the_interpreter():
    """The GPU benchmark's checks and table, at toy sizes, with a dummy timer (nothing is timed here)."""
    from flash_attn_branch import bench

    args = bench.parse_args(
        ["--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "32", "--branch-tokens", "6", "--dtype", "fp16"]
    )
    shapes = [
        bench.Shape("decode", 3, 40, 3, title_len=2),
        bench.Shape("tree", 6, 30, 3, title_len=2),
        bench.Shape("causal", 12, 12, 0),
    ]
    q_branch, k_branch = bench.branch_layout(shapes[0], args.branch_tokens, "cpu")
    assert q_branch.tolist() == [0, 1, 2] and k_branch[:22].eq(-1).all() and k_branch.numel() == 40
    rows = [bench.bench_shape(shape, args, torch.device("cpu"), time_fn=lambda fn: (fn(), 1.0)[1]) for shape in shapes]
    assert [row["ok"] for row in rows] == [True, True, True]
    table = bench.format_table(rows, "header")
    assert table.splitlines()[2].startswith("| shape | q | k | splits | kernel ms |")
    assert len(table.splitlines()) == 4 + len(shapes)


def test_bench_without_cuda_exits_with_code_2(capsys):
    from flash_attn_branch import bench

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_code_path_compiles_without_a_gpu():
    """The interpreter never compiles the kernel; Triton's CUDA backend (ptxas ships with Triton) can, without a GPU.
    Catches what only the compiler rejects, and checks the decode configuration neither spills registers nor loses
    the software pipelining of its key loop."""
    import subprocess

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "flash-attention"), env.get("PYTHONPATH", "")]
    )
    result = subprocess.run(
        [sys.executable, "-m", "flash_attn_branch.compile_check", "--only", "H100 decode b=16 k=8k ("],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    row = result.stdout.strip().splitlines()[-1]
    assert row.startswith("| H100 decode b=16 k=8k (128x64, 8 warps, 2 stages, 32 splits) | sm_90a |"), row


def test_kernel_tests_run_with_the_interpreter_off_in_the_shell():
    """tests/conftest.py forces the interpreter: TRITON_INTERPRET=0 in the environment must not skip these tests."""
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="0")
    test = f"{Path(__file__).resolve()}::test_public_function_non_causal_and_custom_scale"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "skipped" not in proc.stdout
