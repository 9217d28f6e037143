"""``python -m parallel_decoding.serve``: an OpenAI-compatible chat-completions server over the batch engine.

    python -m parallel_decoding.serve                      # the embedded model on http://127.0.0.1:8000/v1
    python -m parallel_decoding.serve --model_path Qwen/Qwen2.5-7B-Instruct --max_batch_size 16 --api_key KEY
    python -m parallel_decoding.serve --engine vllm --engine_args '{"tensor_parallel_size": 2}'   # vLLM batches
    python -m parallel_decoding.serve --engine openai --base_url http://127.0.0.1:8001/v1   # in front of a server

Bad flags are one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys

from parallel_decoding.cli import EXIT_BAD_INPUT, OneLineArgumentParser, UsageError

from .server import add_flags, check_flags, serve, stop_on_signal_while_loading

API_KEY_ENV = "PARALLEL_DECODING_API_KEY"


def parse_args(argv=None):
    p = OneLineArgumentParser(prog="python -m parallel_decoding.serve", description=__doc__.splitlines()[0])
    add_flags(p)
    args = p.parse_args(argv)
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    check_flags(args)
    return args


def main(argv=None) -> int:
    stop_on_signal_while_loading()
    try:
        args = parse_args(argv)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
        return serve(args)
    except UsageError as e:
        print(f"parallel_decoding.serve: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C while loading
        return 0


if __name__ == "__main__":
    sys.exit(main())
