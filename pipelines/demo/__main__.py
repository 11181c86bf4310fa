"""`python -m pipelines.demo ...` is `subq demo ...` (same flags, same --help; what `ray job submit` runs)."""

from pipelines.demo_cmd import register
from subq.cli_options import run_verb

run_verb(register, "demo")
