"""Tokenizer stages (workflow/rules/tokenizer.smk): the base tokenizer in Hugging Face form, vocabulary
expansion with base ids kept, and the compression report."""
