"""cptflow: continual pre-training of LLaMA-family models on a new language, as a Snakemake workflow.

Each stage of the DAG is one module here with a pure core, a ``run(...)`` that does the file I/O and a
``main(argv)`` that the workflow rule calls as ``python -m cptflow.<stage>``.
"""

__version__ = "0.1.0"
