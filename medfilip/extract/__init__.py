"""GPT-IE: turn each report into (severity, location, category) findings with an LLM or rules."""
