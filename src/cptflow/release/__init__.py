"""Release (workflow/rules/release.smk): delta weights of the adapted model against its base, made and
applied back bit for bit."""
