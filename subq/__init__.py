"""subq: distil an LLM's problem-decomposition skill into a compact model (domain core).

This package is the one home of the concepts every pipeline shares: problems and ids
(`subq.problems`), the GSM8K-AI-SubQ row schema and the paper's file formats (`subq.schema`),
prompt templates (`subq.prompts`), reply parsers (`subq.parsers`), scoring (`subq.scoring`),
prices (`subq.costs`), the decomposer text format (`subq.textformat`), storage URIs
(`subq.storage`) and config loading (`subq.config`). Nothing here imports Ray, torch or any
pipeline, so it is fast to import and to test.
"""

__version__ = "0.1.0"
