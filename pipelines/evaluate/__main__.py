"""`python -m pipelines.evaluate ...` is `subq eval ...` (same flags, same --help; what `ray job submit` runs)."""

from pipelines.evaluate_cmd import register
from subq.cli_options import run_verb

run_verb(register, "eval")
