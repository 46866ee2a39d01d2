"""Report (workflow/rules/report.smk): markdown and plots of a run, read from the stages' JSON outputs."""
