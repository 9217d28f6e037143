"""What eval.py drives: metrics, the LLM judge, the summary of one run and the report across runs."""
