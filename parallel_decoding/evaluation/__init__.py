"""What eval.py drives, without torch: metrics.py (speed, exact match, F1, format adherence), judge.py (the LLM judge
client), judging.py (the pool that judges a results file and stores the verdicts), rows.py (reading and checking a
results file), summary.py (one run's summary: table, notes, chart), report.py (every run side by side), and the
shared pieces tables.py (text and Markdown tables) and figures.py (matplotlib, atomic PNG files)."""
