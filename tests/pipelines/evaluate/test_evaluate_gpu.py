"""`subq eval`'s decompose stage on GPU nodes (issue 24): a distilled decomposer's Ray Data actors reserve the
GPUs it is configured with (`decomposer_num_gpus`, as serving's), the model's device follows them, and a cuda
device without a reserved GPU is refused before any work. No Ray, no GPU needed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError


def test_eval_decompose_stage_reserves_the_configured_gpus(tmp_path):
    from pipelines.evaluate import EvalConfig

    with pytest.raises(ValidationError, match="reserves no GPU"):
        EvalConfig(out=str(tmp_path), decomposer={"device": "cuda"})  # would run where Ray gave it no GPU
    from pipelines.evaluate import decompose_resources

    cfg = EvalConfig(out=str(tmp_path), decomposers=["none", "teacher"], decomposer_num_gpus=1)
    assert cfg.decomposer.device == "cuda"  # the reserved GPU is used
    assert decompose_resources(cfg, "distilled") == {"num_cpus": 1, "num_gpus": 1}
    assert decompose_resources(cfg, "teacher") == {"num_cpus": 0.25}  # API calls hold no GPU
    assert decompose_resources(cfg, "none") == {"num_cpus": 0.25}
    assert decompose_resources(EvalConfig(out=str(tmp_path)), "distilled") == {"num_cpus": 1}  # CPU by default
    with pytest.raises(ValidationError, match="left idle"):
        EvalConfig(out=str(tmp_path), decomposer={"device": "cpu"}, decomposer_num_gpus=1)
