"""What generate.py drives: model loading, run settings, the results file, the per-row comparison of the
two modes, and more than one device."""
