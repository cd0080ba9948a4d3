from proto.dyspec.v1 import sampling_pb2 as _sampling_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_CONTEXT: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_CONTEXT: FinishReason

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "text", "token_ids", "max_new_tokens", "sampling", "ignore_eos", "method", "budget")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    text: str
    token_ids: TokenIds
    max_new_tokens: int
    sampling: _sampling_pb2.SamplingParams
    ignore_eos: bool
    method: str
    budget: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_sampling_pb2.SamplingParams, _Mapping]] = ..., ignore_eos: _Optional[bool] = ..., method: _Optional[str] = ..., budget: _Optional[int] = ...) -> None: ...

class WorkerGenerateRequest(_message.Message):
    __slots__ = ("request", "target_address")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TARGET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    request: GenerateRequest
    target_address: str
    def __init__(self, request: _Optional[_Union[GenerateRequest, _Mapping]] = ..., target_address: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("tokens", "summary")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    tokens: TokenChunk
    summary: GenerationSummary
    def __init__(self, tokens: _Optional[_Union[TokenChunk, _Mapping]] = ..., summary: _Optional[_Union[GenerationSummary, _Mapping]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "text_delta")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text_delta: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text_delta: _Optional[str] = ...) -> None: ...

class GenerationSummary(_message.Message):
    __slots__ = ("finish_reason", "stats")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    stats: GenerationStats
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("request_id", "method", "seed", "prompt_tokens", "generated_tokens", "steps", "accepted_tokens", "drafted_tokens", "mean_acceptance_length", "draft_ns", "build_ns", "verify_ns", "target_forward_ns", "target_total_ns", "network_ns", "total_ns", "accepted_per_position", "rounds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTANCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DRAFT_NS_FIELD_NUMBER: _ClassVar[int]
    BUILD_NS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_NS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    method: str
    seed: int
    prompt_tokens: int
    generated_tokens: int
    steps: int
    accepted_tokens: int
    drafted_tokens: int
    mean_acceptance_length: float
    draft_ns: int
    build_ns: int
    verify_ns: int
    target_forward_ns: int
    target_total_ns: int
    network_ns: int
    total_ns: int
    accepted_per_position: _containers.RepeatedScalarFieldContainer[int]
    rounds: _containers.RepeatedCompositeFieldContainer[GenerationRound]
    def __init__(self, request_id: _Optional[str] = ..., method: _Optional[str] = ..., seed: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., drafted_tokens: _Optional[int] = ..., mean_acceptance_length: _Optional[float] = ..., draft_ns: _Optional[int] = ..., build_ns: _Optional[int] = ..., verify_ns: _Optional[int] = ..., target_forward_ns: _Optional[int] = ..., target_total_ns: _Optional[int] = ..., network_ns: _Optional[int] = ..., total_ns: _Optional[int] = ..., accepted_per_position: _Optional[_Iterable[int]] = ..., rounds: _Optional[_Iterable[_Union[GenerationRound, _Mapping]]] = ...) -> None: ...

class GenerationRound(_message.Message):
    __slots__ = ("budget", "drafted_tokens", "accepted_tokens", "round_ns", "draft_ns", "verify_ns", "target_total_ns", "network_ns", "drafted_ahead", "kept_ahead", "overlapped_ns", "wasted_ns", "wait_ns", "target_queue_ns", "batch_sessions", "batch_rows")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUND_NS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_NS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_NS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_NS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_AHEAD_FIELD_NUMBER: _ClassVar[int]
    KEPT_AHEAD_FIELD_NUMBER: _ClassVar[int]
    OVERLAPPED_NS_FIELD_NUMBER: _ClassVar[int]
    WASTED_NS_FIELD_NUMBER: _ClassVar[int]
    WAIT_NS_FIELD_NUMBER: _ClassVar[int]
    TARGET_QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    budget: int
    drafted_tokens: int
    accepted_tokens: int
    round_ns: int
    draft_ns: int
    verify_ns: int
    target_total_ns: int
    network_ns: int
    drafted_ahead: bool
    kept_ahead: bool
    overlapped_ns: int
    wasted_ns: int
    wait_ns: int
    target_queue_ns: int
    batch_sessions: int
    batch_rows: int
    def __init__(self, budget: _Optional[int] = ..., drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., round_ns: _Optional[int] = ..., draft_ns: _Optional[int] = ..., verify_ns: _Optional[int] = ..., target_total_ns: _Optional[int] = ..., network_ns: _Optional[int] = ..., drafted_ahead: _Optional[bool] = ..., kept_ahead: _Optional[bool] = ..., overlapped_ns: _Optional[int] = ..., wasted_ns: _Optional[int] = ..., wait_ns: _Optional[int] = ..., target_queue_ns: _Optional[int] = ..., batch_sessions: _Optional[int] = ..., batch_rows: _Optional[int] = ...) -> None: ...

class WorkerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatsResponse(_message.Message):
    __slots__ = ("active_sessions", "started_sessions", "draining")
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STARTED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    active_sessions: int
    started_sessions: int
    draining: bool
    def __init__(self, active_sessions: _Optional[int] = ..., started_sessions: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...
