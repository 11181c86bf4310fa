"""`DemoConfig`: every setting of `subq demo` (its flags, the YAML `--config` and `python -m pipelines.demo` derive\nfrom it)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

LOCAL_KEY_ENV, LOCAL_KEY = "SUBQ_DEMO_LOCAL_KEY", "subq-demo-local"  # offline: the local server's (unchecked) key;
# a real key the user has exported is never sent to the local server


ALGOS = ("bc", "filtered_bc", "ilql")


class DemoConfig(BaseModel):
    """Everything `subq demo` needs; YAML keys and CLI flags have the same names."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field("subq-demo", description="Output directory (local): generate/, model/, runs/, eval/, report.md.")
    input: str = Field("gsm8k:test", description="Problems: the first `problems` are generated and trained on, the next "
                       "`eval_problems` evaluated. gsm8k:test is what the replay teacher has recordings for.")
    problems: int = Field(48, ge=4, description="Problems to generate GSM8K-AI-SubQ rows for (the training set).")
    eval_problems: int = Field(16, ge=1, description="Held-out problems evaluated through the Serve endpoint.")
    # teacher (generation) and solver (evaluation)
    base_url: Optional[str] = Field(None, description="Real OpenAI-compatible teacher endpoint. None: start the local "
                                    "replay teacher server (offline, no key).")
    teacher_model: str = Field("gpt-3.5-turbo", description="Teacher model (paper: gpt-3.5-turbo).")
    api_key_env: str = Field("OPENAI_API_KEY", description="NAME of the env var holding the teacher/solver key.")
    solver_model: Optional[str] = Field(None, description="Solver model for evaluation (default: teacher_model).")
    solver_base_url: Optional[str] = Field(None, description="Solver endpoint (default: the teacher's).")
    n_sets: int = Field(3, ge=1, description="Sub-question sets per problem (paper: 3).")
    n_feedback: int = Field(3, ge=0, description="Feedback calls per set (paper: 3).")
    rpm: Optional[float] = Field(3000.0, gt=0, description="Cluster-wide requests/minute to the teacher (generation) "
                                 "and the solver (evaluation); the replay server enforces it with 429 + Retry-After.")
    tpm: Optional[float] = Field(None, gt=0, description="Cluster-wide teacher tokens/minute.")
    actors: str = Field("2,2", description="Teacher actor pool MIN,MAX (Ray Data autoscaling).")
    batch_size_generate: int = Field(4, ge=1, description="Problems per generation batch (one Parquet part each).")
    max_cost_usd: Optional[float] = Field(None, gt=0, description="Stop generation cleanly after this much spend.")
    teacher_latency_s: float = Field(0.1, ge=0, description="Replay server: mean reply latency (seconds).")
    # decomposer training
    model: Optional[str] = Field(None, description="Base decomposer (HF causal LM directory). None: `subq init-model`.")
    algos: list[Literal["bc", "filtered_bc", "ilql"]] = Field(["bc", "filtered_bc", "ilql"], description="Algorithms "
                                                              "to train, in order; FBC/ILQL start from BC when BC is "
                                                              "listed. ILQL runs are labelled ilql-sparse / ilql-dense.")
    ilql_rewards: Literal["sparse", "dense"] = Field("dense", description="ILQL rewards.")
    steps: int = Field(60, ge=1, description="Optimizer steps for BC; FBC and ILQL get half (they start from BC). 60 keeps "
                       "the whole demo within about 6 minutes on 2 CPU cores; raise it for better decomposers.")
    batch_size: int = Field(8, ge=1, description="Micro batch per training worker.")
    lr: float = Field(1e-3, gt=0, description="Learning rate (higher than the paper's 1e-4: a tiny model, few steps).")
    num_workers: int = Field(2, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="Train and serve on GPUs.")
    deepspeed: str = Field("zero2", description="DeepSpeed preset (zero0..zero3) or JSON config path.")
    max_new_tokens: int = Field(256, ge=1, description="Decomposer tokens per decomposition (validation and serving); "
                                "the release allowed the reference length + 200 (subq.textformat).")
    beta: Optional[float] = Field(None, description="ILQL guidance weight when serving an ILQL decomposer (None: the checkpoint's own ilql.beta).")
    # cluster
    ray_address: Optional[str] = Field(None, description="Join this Ray cluster (default: RAY_ADDRESS, else start one).")
    port: int = Field(0, ge=0, le=65535, description="Serve HTTP port on 127.0.0.1 (0: a free one).")

    @field_validator("algos", mode="before")
    @classmethod
    def _algos(cls, v):
        if isinstance(v, str):
            v = [a.strip() for a in v.split(",") if a.strip()]
        if not v:
            raise ValueError(f"name at least one of {', '.join(ALGOS)}")
        return v

    @field_validator("actors")
    @classmethod
    def _actors(cls, v: str) -> str:
        from pipelines.generate import GenerateConfig

        from pydantic import ValidationError

        try:
            GenerateConfig.model_validate({"output": "x", "actors": v})  # the generation job's own rule (MIN,MAX)
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return v

    @property
    def solver(self) -> str:
        return self.solver_model or self.teacher_model

    @property
    def offline(self) -> bool:
        return self.base_url is None

    @property
    def key_env(self) -> str:
        return LOCAL_KEY_ENV if self.offline else self.api_key_env
