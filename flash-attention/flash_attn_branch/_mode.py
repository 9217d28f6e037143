"""Whether Triton runs kernels through its CPU interpreter (`TRITON_INTERPRET=1`), read at call time."""

import os


def interpreter_enabled() -> bool:
    try:
        import triton

        knobs = getattr(triton, "knobs", None)  # triton >= 3.4
        if knobs is not None:
            return bool(knobs.runtime.interpret)
    except ImportError:
        pass
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
