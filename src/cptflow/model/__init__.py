"""Model stages (workflow/rules/model.smk): Hugging Face model I/O, the model side of training, the demo's
bootstrapped base, and init_model (resized embeddings with initialised new rows)."""
