"""`python -m training.train ...` is `subq train ...` (same flags, same --help; what `ray job submit` runs)."""

from training.train_cmd import register
from subq.cli_options import run_verb

run_verb(register, "train")
