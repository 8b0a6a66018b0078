"""What crosses the wire of `star serve`: request, response and error bodies.

These models are the service's contract: FastAPI derives the OpenAPI schema from them,
and `star recommend` prints the same `RecommendResponse` that the HTTP service returns,
so a terminal answer and an HTTP answer cannot drift apart. Ids are strings (a JSON
number is accepted and read as its decimal text, since numeric ids such as MovieLens'
are often sent as numbers).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)


def _id_text(value: Any) -> Any:
    """An integer id sent as a JSON number becomes its text; anything else is left to
    the string check (a float or a bool is refused there, not silently rounded)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


Id = Annotated[str, BeforeValidator(_id_text), StringConstraints(min_length=1, max_length=256)]


class Wire(BaseModel):
    """Unknown fields are refused: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class RecommendOptions(Wire):
    mode: str | None = Field(
        None, description="How the system answers, where it has more than one way (a "
        "student's mode); `GET /v1/ready` lists the system's modes. Default: its first.")
    explain: bool = Field(
        False, description="Also return the evidence the system read, its reasoning text "
        "and its tool calls (where it has any).")
    n_candidates: int = Field(
        20, ge=1, description="Without `candidates`: how many items the proposer takes "
        "from the catalogue (its top N, the history left out) for the system to rank.")


class RecommendRequest(Wire):
    """A user id, a history, or both; candidate ids, or none (then they are proposed)."""

    user_id: Id | None = Field(
        None, description="A user of the serving data. Without `history`, that user's "
        "sequence in the serving data is the history (it must be a known user); with "
        "`history`, the id only names the requester (it may be new).")
    history: list[Id] | None = Field(
        None, description="Item ids the user consumed, oldest first; overrides the stored "
        "history of `user_id`.")
    candidates: list[Id] | None = Field(
        None, description="Item ids to rank, distinct. Omitted: the service proposes them "
        "from the catalogue and says which ranker did (`proposer`).")
    options: RecommendOptions = Field(default_factory=RecommendOptions)

    @model_validator(mode="after")
    def _someone(self) -> RecommendRequest:
        if self.user_id is None and self.history is None:
            raise ValueError("give a user_id, a history, or both")
        return self


class RankedItem(Wire):
    rank: int = Field(description="1 is the best.")
    item_id: str
    title: str
    score: float | None = Field(
        None, description="The system's score (higher is better) where it has one: "
        "baselines and cst; none for LLM systems.")


class ToolCallRecord(Wire):
    name: str
    arguments: dict[str, Any]
    response: str | None = Field(None, description="The text the system read back.")
    ok: bool = True
    agent: str | None = Field(None, description="The teacher's agent that made the call.")
    seconds: float | None = None


class Reasoning(Wire):
    plan: str | None = None
    findings: dict[str, str] = Field(
        default_factory=dict, description="The teacher's analysts' final findings.")
    reflection: str | None = None
    text: str | None = Field(
        None, description="A student's whole output as generated, tool responses included.")


class Usage(Wire):
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(Wire):
    total_ms: float = Field(description="From the request's admission to its answer.")
    queue_ms: float = Field(0.0, description="Waiting for a worker (with micro-batching: "
                            "for the batch to start).")
    propose_ms: float = Field(0.0, description="Proposing candidates (0 when given).")
    rank_ms: float = Field(description="The system's own answer (with micro-batching: the "
                           "whole batch's).")
    batch_size: int = Field(1, ge=1, description="Requests answered together in one batch "
                            "(micro-batching); 1: alone.")


class RecommendResponse(Wire):
    system: str
    mode: str
    user_id: str | None
    history_length: int
    history_source: Literal["request", "stored"] = Field(
        description="`stored`: the user's sequence in the serving data.")
    candidates_source: Literal["request", "proposed"]
    proposer: str | None = Field(
        None, description="The ranker that proposed the candidates (when proposed).")
    ranking: list[RankedItem]
    valid: bool = Field(
        True, description="The system's own output was a complete permutation of the "
        "candidates; otherwise what it ranked comes first, then the rest in the order it "
        "was shown them.")
    fallback: str | None = Field(
        None, description="Why the ranking is a fallback and not the system's own answer.")
    evidence: list[str] | None = Field(
        None, description="With `explain`: the CST evidence lines the system read (the "
        "candidate lines its prompt showed or its score came from; a student's tool "
        "responses).")
    reasoning: Reasoning | None = None
    tool_calls: list[ToolCallRecord] | None = None
    usage: Usage = Field(default_factory=Usage)
    timings: Timings


class ErrorDetail(Wire):
    loc: list[str | int] = Field(default_factory=list)
    msg: str
    type: str | None = None


class ErrorInfo(Wire):
    code: str = Field(description="What went wrong, for programs: unauthorized (401), "
                      "body_too_large (413), invalid_request, unknown_ids, candidate_count, "
                      "duplicate_candidates, too_many_history_items, invalid_mode (422), "
                      "overloaded, shutting_down (503), timeout (504), not_found, "
                      "method_not_allowed, internal (500).")
    message: str
    details: list[ErrorDetail] | None = None
    unknown_users: list[str] | None = None
    unknown_items: list[str] | None = None
    request_id: str | None = None


class ErrorResponse(Wire):
    error: ErrorInfo


class Health(Wire):
    status: Literal["ok"] = "ok"


class Limits(Wire):
    max_history: int = Field(description="Items in a request's `history`.")
    max_candidates: int = Field(description="Items in a request's `candidates` (and the "
                                "most `n_candidates` may ask for).")
    min_candidates: int
    max_body_bytes: int | None = None
    max_queue: int | None = None
    timeout_s: float | None = None


class Readiness(Wire):
    ready: bool
    status: Literal["starting", "ready", "failed"] = Field(
        description="starting: warming up (it answers, more slowly); failed: the warm-up "
        "failed (see `message`).")
    system: str
    kind: Literal["ranker", "llm"]
    modes: list[str]
    proposer: str | None
    catalogue_items: int
    known_users: int
    limits: Limits
    compute_threads: int | None = Field(None, description="torch / BLAS threads the process "
                                        "computes with.")
    message: str | None = None
