"""Ray actors shared by the pipelines: the cluster-wide rate limiter and the teacher (OpenAI client)."""
