"""`GenerateConfig`: every setting of a generation run, in one place. `subq generate`'s flags, the `--config` YAML
and `python -m pipelines.generate` all derive from it (subq.cli_options). Light imports only (pydantic), so the CLI
starts fast; the job itself is pipelines.generate."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field, field_validator

from subq.settings import EndpointSettings



class GenerateConfig(EndpointSettings):
    """Everything a generation run needs; YAML keys and CLI flags have the same names. The teacher endpoint's
    settings (model, base_url, api_key_env, rpm, tpm, retries, timeouts, prices) are subq.settings.EndpointSettings."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field("gsm8k:train", description="Problems: a dataset name (gsm8k:train, gsm8k:test, "
                       "gsm8k-ai-subq:test) or a .jsonl/.json/.parquet path or URI with question/answer fields.")
    output: str = Field(..., description="Output directory or URI (layout in the module docstring).")
    template: Literal["paper", "doc"] = Field("paper", description="Prompt template family (subq.prompts): "
                                             "paper = the release's QG/QA/feedback prompts; doc = Divide-or-Conquer "
                                             "decompose/solve + the paper's feedback (answer_correctness by the strict "
                                             "rule, which reads 'The answer is: X').")
    n_sets: int = Field(3, ge=1, description="Sub-question sets per problem (paper: 3).")
    n_feedback: int = Field(3, ge=0, description="Feedback calls per set (paper: 3).")
    temperature: float = Field(0.7, ge=0, le=2, description="Teacher sampling temperature (paper: 0.7).")
    max_tokens: int = Field(512, ge=1, description="max_tokens per teacher call.")
    max_concurrency: int = Field(32, ge=1, description="Teacher calls in flight per actor.")
    actors: tuple[int, int] = Field((1, 2), description="Teacher actor pool size MIN,MAX (Ray Data autoscaling).")
    batch_size: int = Field(8, ge=1, description="Problems per Ray Data batch (one Parquet part per batch).")
    actor_num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per teacher actor (they mostly wait).")
    actor_resources: dict[str, float] = Field({"generation": 1}, description="Custom resources per teacher actor: what ray_cluster.yaml's cpu_generation nodes advertise, so the autoscaler adds them for the pool (cluster/connect.py `schedulable`: dropped where no node has them and none is autoscaled, e.g. a local Ray).")
    limit: Optional[int] = Field(None, ge=1, description="Only the first N problems of the input.")
    max_cost_usd: Optional[float] = Field(None, gt=0, description="Stop cleanly once this run has spent this much.")
    dry_run: bool = Field(False, description="Print the token and cost estimate; make no calls, write nothing.")
    retry_failed: bool = Field(False, description="Process only problems in the failures table (not yet a row).")
    max_resamples: int = Field(2, ge=0, description="Re-samples of a reply that does not parse.")
    progress_interval_s: float = Field(5.0, gt=0, description="Seconds between progress lines (stderr).")
    ray_address: Optional[str] = Field(None, description="Ray cluster to join (None: RAY_ADDRESS or a local one).")
    ray_num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of a local Ray started by this job.")
    lease_timeout_s: float = Field(120.0, gt=0, description="A job's lease on OUTPUT is stale (taken over) after "
                                   "this many seconds without a heartbeat.")
    output_lease: Literal["exclusive", "off"] = Field("exclusive", description="exclusive: OUTPUT/_lease.json, taken "
                                                      "with an atomic create (local or mounted paths; object "
                                                      "stores are refused: pyarrow has no conditional put); off: "
                                                      "no lease (you make sure only one job writes OUTPUT).")
    api: Literal["online", "batch"] = Field("online", description="online: chat calls through rate-limited actors; "
                                           "batch: the provider's Batch API at its batch price (pipelines/generate/batch.py).")
    cancel: bool = Field(False, description="Batch mode: cancel the batches this output has in flight, then stop.")
    batch_max_requests: int = Field(50_000, ge=1, le=50_000, description="Requests per batch file (provider cap).")
    batch_max_bytes: int = Field(200_000_000, ge=1, le=200_000_000, description="Bytes per batch file (provider "
                                 "cap: 200 MB).")
    batch_max_in_flight: int = Field(20, ge=1, description="Batches running at the provider at once.")
    batch_poll_s: float = Field(30.0, gt=0, description="Seconds between batch status polls.")
    batch_max_submissions: int = Field(3, ge=1, description="Times a request is submitted in a batch before it is "
                                       "a recorded failure (expired, cancelled or failed batches resubmit).")

    @field_validator("actors", mode="before")
    @classmethod
    def _actors(cls, v):
        if isinstance(v, str):
            try:
                parts = [int(x) for x in v.replace(" ", "").split(",") if x]
            except ValueError:
                raise ValueError("expected MIN,MAX (e.g. 2,8) or N") from None
            v = parts
        if isinstance(v, int):
            v = (v, v)
        v = tuple(v)
        if len(v) == 1:
            v = (v[0], v[0])
        if len(v) != 2 or v[0] < 1 or v[1] < v[0]:
            raise ValueError("expected MIN,MAX with 1 <= MIN <= MAX")
        return v
