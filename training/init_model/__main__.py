"""`python -m training.init_model ...` is `subq init-model ...` (same flags, same --help; what `ray job submit` runs)."""

from training.train_cmd import register
from subq.cli_options import run_verb

run_verb(register, "init-model")
