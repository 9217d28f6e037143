"""Benchmarks: the branch stage alone (``python -m parallel_decoding.bench``), whole rows
(``python -m parallel_decoding.bench.rows``) and the GPU check (``python -m parallel_decoding.bench.gpu_check``)."""
