"""What generate.py drives: the run's loop (driver), its flags' checks (flags) and settings (settings), the model
(loading), the per-row comparison of the two modes (comparison), the results file (results), and more than one
device (distributed)."""
