"""Ray Data / Ray Serve jobs: generation, serving, evaluation (and the local teacher server)."""
