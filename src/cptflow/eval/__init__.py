"""Evaluation (workflow/rules/eval.smk): benchmarks in their original layouts, multiple-choice scoring,
bits per character on held-out text, and the side-by-side comparison of models."""
