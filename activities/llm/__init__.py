"""The LLM that ``Ask``'s generate step calls: an OpenAI-compatible client, its circuit
breaker and caches."""
