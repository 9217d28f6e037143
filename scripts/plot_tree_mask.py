"""Draw the tree attention mask of one branch stage: ``python scripts/plot_tree_mask.py [--out docs/tree_mask.png]``.

The layout is the engine's: a shared prefix, every branch's title prefilled in one pass, then one token per active
branch per decode step (branch 1 finishes after two steps and leaves). Row = query token, column = key token; a
coloured cell is a key the query can see, in the colour of the key's branch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parallel_decoding.decoding.interface import SHARED, branch_mask  # noqa: E402


def example_layout() -> tuple[list[int], list[str]]:
    prefix = [SHARED] * 5
    titles = [0, 0, 1, 2, 2, 2]  # tree prefill: title tokens of branches 0, 1, 2
    steps = [[0, 1, 2], [0, 1, 2], [0, 2], [0, 2]]  # branch 1 stopped after two tokens
    key_branch = prefix + titles + [b for step in steps for b in step]
    labels = ["P"] * len(prefix) + [f"t{b}" for b in titles] + [f"b{b}" for step in steps for b in step]
    return key_branch, labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "tree_mask.png"))
    args = parser.parse_args(argv)

    key_branch, labels = example_layout()
    ids = torch.tensor(key_branch, dtype=torch.int32)
    visible = (branch_mask(ids, ids, torch.float32)[0, 0] == 0).numpy()  # (K, K): every token as a query
    colours = np.array([[0.55, 0.55, 0.55], [0.12, 0.47, 0.71], [1.0, 0.5, 0.05], [0.17, 0.63, 0.17]])
    image = np.ones((*visible.shape, 3))
    for j, b in enumerate(key_branch):
        image[visible[:, j], j] = colours[b + 1]

    fig, ax = plt.subplots(figsize=(6.4, 6.4))
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("key (P = shared prefix, tN = title of branch N, bN = token of branch N)")
    ax.set_ylabel("query")
    ax.set_title("Tree attention mask of the branch stage")
    for edge in (4.5, 10.5):
        ax.axhline(edge, color="black", lw=0.6)
        ax.axvline(edge, color="black", lw=0.6)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
