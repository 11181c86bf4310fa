"""`python -m pipelines.generate ...` is `subq generate ...` (same flags, same --help; what `ray job submit` runs)."""

from pipelines.generate_cmd import register
from subq.cli_options import run_verb

run_verb(register, "generate")
