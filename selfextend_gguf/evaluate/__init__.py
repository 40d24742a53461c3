"""Long-context evaluation (issue 5): prompts, methods, the sweep harness, plots.

scripts/eval_long_context.py is the command line; docs/long_context.md has the results.
"""
