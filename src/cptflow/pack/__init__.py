"""Pack stage (workflow/rules/pack.smk): tokenized documents spliced into fixed-length samples and mixed
into buckets by category weight and replay share."""
