"""The HTTP contract: request models and their bounds, OpenAI's error shape, chat completions and SSE chunks."""

import logging
import re
import time
import uuid
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.serve_auth import (
    GuardMiddleware,
    current_request_id,
    error_body,
    guard,
)


def _chat_response(model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """A chat.completion built from the openai package's types. choices: {"text": what the model generated,
    "finish_reason": "stop" | "length"} and, from the decomposer, "sub_questions" (the text parsed with the
    checkpoint's format): our extension field on each choice, next to `message`."""
    from openai.types.chat import ChatCompletion, ChatCompletionMessage
    from openai.types.chat.chat_completion import Choice
    from openai.types.completion_usage import CompletionUsage

    out = ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}", object="chat.completion", created=int(time.time()), model=model,
        choices=[Choice(index=i, message=ChatCompletionMessage(role="assistant", content=c["text"]),
                        finish_reason=c["finish_reason"]) for i, c in enumerate(choices)],
        usage=CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens),
    ).model_dump(mode="json", exclude_none=True)
    for c, o in zip(choices, out["choices"]):
        if "sub_questions" in c:
            o["sub_questions"] = c["sub_questions"]
    return out


def problem_from_messages(msgs: list[dict]) -> str:
    """The problem in a chat request to the decomposer: the last user message, after its last `Problem:` (the
    paper's QG prompt) or `Question:` (DoC's decompose prompt) marker when present, so our decomposer can stand
    in for the teacher's QG calls."""
    users = [m for m in msgs if m.get("role") == "user"]
    text = (users[-1] if users else msgs[-1]).get("content") or ""
    if isinstance(text, list):  # content parts
        text = " ".join(p.get("text", "") for p in text if isinstance(p, dict))
    for marker in ("Problem:", "Question:"):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text.strip()




class ApiError(Exception):
    """An HTTP error in OpenAI's error shape. `upstream_status`: the solver upstream's HTTP status, if any."""

    def __init__(self, status: int, message: str, *, field: Optional[str] = None, type_: str = "invalid_request_error",
                 code: Optional[str] = None, upstream: Optional[str] = None, headers: Optional[dict] = None,
                 upstream_status: Optional[int] = None):
        self.status, self.message, self.field, self.type, self.code = status, message, field, type_, code
        self.upstream, self.headers, self.upstream_status = upstream, headers or {}, upstream_status


api = FastAPI(title="subq", description="Distilled decomposer + solver, on Ray Serve.")
api.add_middleware(GuardMiddleware)


log = logging.getLogger("ray.serve")


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError):
    rid = current_request_id() if e.status >= 500 else None  # the log has the details under this id
    status = 400 if e.status == 422 else e.status  # OpenAI's status for a bad request: no route answers 422
    return JSONResponse(error_body(e.message, e.type, e.field, e.code or ("invalid_value" if status == 400 else None),
                                   request_id=rid), status_code=status, headers=e.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), status_code=e.status_code,
                        headers=getattr(e, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        msg = f"malformed JSON: {first.get('msg')} (at {first.get('ctx', {}).get('error', '')})".strip()
        return JSONResponse(error_body(msg, "invalid_request_error", "body", "invalid_json"), status_code=400)
    msg = first.get("msg", "invalid value")
    kind = first.get("type")
    code = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter"}.get(kind, "invalid_value")
    if kind == "extra_forbidden":
        msg = "unrecognized request argument (not an OpenAI field, or one this server does not know)"
    # OpenAI's status and shape for every invalid request (the SDK raises BadRequestError with .param and .code)
    return JSONResponse(error_body(f"field '{field}': {msg}", "invalid_request_error", field, code), status_code=400)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _nonempty(v: str, field: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{field} must be a non-empty string")
    return v


class DecomposeRequest(_Strict):
    problem: str = Field(..., description="The math word problem.")
    beta: Optional[float] = Field(None, ge=-100, le=100, description="ILQL guidance weight (default: the server's).")
    do_sample: Optional[bool] = Field(None, description="Sample instead of greedy.")
    temperature: Optional[float] = Field(None, gt=0, le=10, description="Sampling temperature.")
    max_new_tokens: Optional[int] = Field(None, gt=0, le=4096, description="Max generated tokens.")

    _p = field_validator("problem")(lambda v: _nonempty(v, "problem"))


Decomposer = Literal["distilled", "teacher", "none"]


def _bounded_list(v: Any, field: str, item_type: type, what: str) -> Any:
    """Type and size of a list checked before its elements are validated one by one: a 1 MB `[0, 0, ...]` costs
    one error, not one error object per element."""
    if v is None:
        return v
    if not isinstance(v, list):
        raise ValueError(f"{field} must be a list of {what}")
    limit = int((guard() or {}).get("max_list_items") or 500)
    if len(v) > limit:
        raise ValueError(f"{len(v)} items; the limit is {limit} (max_inline_problems)")
    for i, x in enumerate(v):
        if not isinstance(x, item_type):
            raise ValueError(f"item {i} must be {what}, got {type(x).__name__}")
    return v


class SolveRequest(_Strict):
    problem: str = Field(..., description="The math word problem.")
    decomposer: Decomposer = Field("distilled", description="distilled (our model), teacher (the solver endpoint's QG), none (single-stage).")
    sub_questions: Optional[list[str]] = Field(None, description="Skip decomposition and use these sub-questions.")
    gold_answer: Optional[str] = Field(None, description="If given, the reply is scored in every mode.")

    _p = field_validator("problem")(lambda v: _nonempty(v, "problem"))
    _q = field_validator("sub_questions", mode="before")(lambda v: _bounded_list(v, "sub_questions", str, "strings"))


class InlineProblem(_Strict):
    """One uploaded problem: a text (`question` or `problem`) and a gold answer (`answer`, `gold_answer` or
    `true_answer`: GSM8K's '... #### N' or a number)."""

    question: Optional[str] = None
    problem: Optional[str] = None
    answer: Optional[Union[str, float]] = None
    gold_answer: Optional[Union[str, float]] = None
    true_answer: Optional[Union[str, float]] = None

    @model_validator(mode="after")
    def _need(self) -> "InlineProblem":
        if not (self.question or self.problem or "").strip():
            raise ValueError("each record needs a non-empty `question` (or `problem`)")
        if self.gold() is None:
            raise ValueError("each record needs a gold answer (`answer`, `gold_answer` or `true_answer`)")
        return self

    def text(self) -> str:
        return self.question if self.question is not None else self.problem or ""

    def gold(self):
        for g in (self.answer, self.gold_answer, self.true_answer):
            if g is not None:
                return g
        return None


class EvaluationRequest(_Strict):
    dataset: Optional[str] = Field("gsm8k:test", max_length=200, description="A dataset NAME from the server's registry: the built-in splits (gsm8k:test, gsm8k:train, gsm8k:test_socratic, gsm8k-ai-subq:test) and the operator's `datasets`. Never a path or URI.")
    records: Optional[list[InlineProblem]] = Field(None, description="Problems inline instead of `dataset` (at most max_inline_problems).")
    decomposer: Decomposer = Field("distilled", description="distilled | teacher | none.")
    solver: Optional[str] = Field(None, max_length=200, description="Solver model id (must be the served solver's name; default: it).")
    scoring_mode: Literal["paper", "strict", "flexible"] = Field("paper", description="Headline mode; all modes are reported.")
    limit: int = Field(20, gt=0, description="Evaluate the first N problems (at most max_eval_problems).")
    max_cost_usd: Optional[float] = Field(None, gt=0, description="Stop once this much is spent (at most the server's max_eval_cost_usd).")
    exclude_few_shot: bool = Field(False, description="Drop the GSM8K test problems the paper's prompts quote as few-shot examples.")

    _r = field_validator("records", mode="before")(lambda v: _bounded_list(v, "records", dict, "objects"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    role: str = Field(..., max_length=32)
    content: Any = None


MAX_CHOICES, MAX_STOP, MAX_STOP_CHARS = 16, 4, 200


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None  # accepted; our chunks carry no obfuscation padding


def _stop_list(v: Any) -> Optional[list[str]]:
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise ValueError("stop must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise ValueError(f"{len(stops)} stop sequences; at most {MAX_STOP}")
    if any(not x or len(x) > MAX_STOP_CHARS for x in stops):
        raise ValueError(f"stop sequences must be 1 to {MAX_STOP_CHARS} characters")
    return stops


class ChatRequest(BaseModel):
    """OpenAI's chat request. Every field is honoured, refused (`CHAT_REFUSED`: 400 naming it unless it has its
    no-op value) or accepted with no effect (`CHAT_IGNORED`: account, caching and routing hints OpenAI also accepts
    on every model); a field OpenAI does not define is 400 `unknown_parameter`, as OpenAI answers it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(..., max_length=200)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=64)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    max_tokens: Optional[int] = Field(None, gt=0, le=4096)
    max_completion_tokens: Optional[int] = Field(None, gt=0, le=4096)
    n: Optional[int] = Field(None, ge=1, le=MAX_CHOICES)
    seed: Optional[int] = Field(None, ge=-(2**62), le=2**62)
    stop: Optional[Any] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    # refused unless absent or their no-op value
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list] = None
    function_call: Optional[Any] = None
    response_format: Optional[dict] = None
    modalities: Optional[list] = None
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    web_search_options: Optional[Any] = None
    reasoning_effort: Optional[Any] = None
    verbosity: Optional[Any] = None
    moderation: Optional[Any] = None
    # accepted, no effect
    user: Optional[str] = Field(None, max_length=256)
    metadata: Optional[dict] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = Field(None, max_length=32)
    safety_identifier: Optional[str] = Field(None, max_length=256)
    prompt_cache_key: Optional[str] = Field(None, max_length=256)
    prompt_cache_retention: Optional[str] = Field(None, max_length=32)
    prompt_cache_options: Optional[Any] = None

    _s = field_validator("stop", mode="before")(lambda v: _stop_list(v))


# field -> (the values that do nothing, why it is refused otherwise); checked in this order
CHAT_REFUSED: dict[str, tuple[Any, str]] = {
    "tools": (lambda v: not v, "tool calling is not supported"),
    "tool_choice": (lambda v: v == "none", "tool calling is not supported"),
    "parallel_tool_calls": (lambda v: False, "only allowed with tools, which are not supported"),
    "functions": (lambda v: not v, "function calling is not supported"),
    "function_call": (lambda v: v == "none", "function calling is not supported"),
    "response_format": (lambda v: v.get("type") == "text", "only {'type': 'text'} is supported"),
    "logprobs": (lambda v: not v, "token log-probabilities are not returned"),
    "top_logprobs": (lambda v: False, "token log-probabilities are not returned"),
    "frequency_penalty": (lambda v: v == 0, "penalties are not supported"),
    "presence_penalty": (lambda v: v == 0, "penalties are not supported"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "modalities": (lambda v: list(v) == ["text"], "only text output"),
    "audio": (lambda v: False, "only text output"),
    "prediction": (lambda v: False, "predicted outputs are not supported"),
    "web_search_options": (lambda v: False, "web search is not supported"),
    "reasoning_effort": (lambda v: False, "not a reasoning model"),
    "verbosity": (lambda v: False, "not supported by this model"),
    "moderation": (lambda v: False, "moderation is not supported"),
}
CHAT_IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                "prompt_cache_retention", "prompt_cache_options", "stream_options.include_obfuscation")
SOLVER_CHAT_REFUSED = ("n", "seed", "top_p", "stop")  # the local solver's chat path (HF generate) takes none of them


def chat_refusal(req: ChatRequest, solver: bool = False) -> Optional[ApiError]:
    """The first field of `req` we do not honour, as OpenAI's 400 naming it; None when every field is honoured."""
    for name, (noop, why) in CHAT_REFUSED.items():
        v = getattr(req, name)
        if v is not None and not noop(v):
            return ApiError(400, f"'{name}' is not supported: {why}", field=name, code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        return ApiError(400, "'stream_options' is only allowed when 'stream' is true", field="stream_options",
                        code="invalid_value")
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
        return ApiError(400, "max_tokens and max_completion_tokens differ: give one", field="max_completion_tokens",
                        code="invalid_value")
    if solver:
        for name in SOLVER_CHAT_REFUSED:
            v = getattr(req, name)
            if v is not None and not (name == "n" and v == 1) and not (name == "top_p" and v == 1):
                return ApiError(400, f"'{name}' is not supported by the local solver model (the decomposer model "
                                     f"supports it)", field=name, code="unsupported_parameter")
    return None


def _limit(text: Optional[str], limit: int, field: str, setting: str = "max_problem_chars") -> None:
    if text is not None and len(text) > limit:
        raise ApiError(400, f"field '{field}': {len(text)} characters; the limit is {limit} ({setting})", field=field,
                       code="string_too_long")


def _problem_limit(text: str, limit: int, field: str) -> None:
    _limit(text, limit, field)



def _sse_chunks(completion: dict, include_usage: bool):
    """A finished chat.completion as server-sent `chat.completion.chunk` events (role, content word by word,
    finish_reason, optional usage), then `data: [DONE]`, built from the openai package's types."""
    from openai.types.chat import ChatCompletionChunk
    from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta
    from openai.types.completion_usage import CompletionUsage

    base = {"id": completion["id"], "created": completion["created"], "model": completion["model"],
            "object": "chat.completion.chunk"}

    def event(choices, **extra) -> str:
        chunk = ChatCompletionChunk(**base, choices=choices, **extra)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    for ch in completion["choices"]:  # choice after choice (n > 1), each ending with its finish_reason
        i, text = ch["index"], ch["message"].get("content") or ""
        yield event([Choice(index=i, delta=ChoiceDelta(role="assistant", content=""), finish_reason=None)])
        for piece in re.findall(r"\S*\s*", text):
            if piece:
                yield event([Choice(index=i, delta=ChoiceDelta(content=piece), finish_reason=None)])
        extra = {"sub_questions": ch["sub_questions"]} if "sub_questions" in ch else {}
        yield event([Choice(index=i, delta=ChoiceDelta(), finish_reason=ch["finish_reason"], **extra)])
    if include_usage:
        yield event([], usage=CompletionUsage(**completion["usage"]))
    yield "data: [DONE]\n\n"
