"""Retrieval-augmented generation without a network: re-ranking, token counting, extractive
summaries, prompt fusion, and the guardrails (PII redaction, prompt-injection and
citation checks) that every prompt and answer passes through."""
