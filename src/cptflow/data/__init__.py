"""Data stages (workflow/rules/data.smk): raw corpus files → ingest → clean → signature → bands → clusters →
dedup → decontaminate → pii → shards per category, with the funnel of what each stage kept and dropped."""
