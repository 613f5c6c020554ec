"""Stand-ins for tests and benchmarks (a loopback OpenAI-compatible server): never a stage dependency."""
