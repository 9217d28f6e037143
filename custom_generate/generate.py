"""Parallel decoding of independent branches inside one sequence, as a transformers ``custom_generate`` method.

    model.generate(**inputs, custom_generate="<this repository>", trust_remote_code=True, tokenizer=tokenizer)

transformers runs this file and calls :func:`generate` with ``model`` and every argument of ``generate``. The
method itself lives in the ``parallel-decoding`` package (``requirements.txt`` here names it and the transformers
releases it is tested with; transformers checks them before it calls ``generate``), so a copy of this directory
works wherever that package is installed. README.md beside this file describes the arguments and the result.
"""

try:
    from parallel_decoding.integrations.transformers_generate import generate_from_arguments
except ModuleNotFoundError as error:  # a try block: transformers' import scan leaves it to this message
    if not (error.name or "").startswith("parallel_decoding"):
        raise
    raise ImportError(
        "this custom_generate method needs the parallel-decoding package, with parallel_decoding.integrations: "
        'install it from its repository (pip install -e ".[test]" ./flash-attention in a checkout)'
    ) from error


def generate(model, *args, **kwargs):
    """``model.generate(...)`` with parallel decoding: the arguments and the result are described in README.md."""
    return generate_from_arguments(model, *args, **kwargs)
