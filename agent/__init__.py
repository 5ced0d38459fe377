"""The cmdgate agent: verifies tokens, decides through two gates, runs templates, audits."""
