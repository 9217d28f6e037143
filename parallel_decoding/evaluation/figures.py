"""matplotlib for the charts of eval.py (summary.py, report.py): loaded on first use, written atomically."""

from ..runs.results import atomic_file


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display). Imported here, not at module level, so that
    the tables and metrics load without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png_atomic(fig, path):
    """Save a figure as PNG atomically (results.atomic_file: readers see the old file or the new one), then close
    it, also when saving fails."""
    plt = pyplot()
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
