"""Host-side request handling: detokenization (and, with the engine, LLM / AsyncEngine)."""
