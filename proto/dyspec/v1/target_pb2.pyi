from proto.dyspec.v1 import sampling_pb2 as _sampling_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DrawMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRAW_MODE_UNSPECIFIED: _ClassVar[DrawMode]
    DRAW_MODE_WITHOUT_REPLACEMENT: _ClassVar[DrawMode]
    DRAW_MODE_WITH_REPLACEMENT: _ClassVar[DrawMode]
    DRAW_MODE_DETERMINISTIC: _ClassVar[DrawMode]
DRAW_MODE_UNSPECIFIED: DrawMode
DRAW_MODE_WITHOUT_REPLACEMENT: DrawMode
DRAW_MODE_WITH_REPLACEMENT: DrawMode
DRAW_MODE_DETERMINISTIC: DrawMode

class TargetRequest(_message.Message):
    __slots__ = ("open", "resume", "tree", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    resume: ResumeSession
    tree: Tree
    close: CloseSession
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., resume: _Optional[_Union[ResumeSession, _Mapping]] = ..., tree: _Optional[_Union[Tree, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "model", "prompt_token_ids", "sampling", "resumable")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESUMABLE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _sampling_pb2.SamplingParams
    resumable: bool
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_sampling_pb2.SamplingParams, _Mapping]] = ..., resumable: _Optional[bool] = ...) -> None: ...

class ResumeSession(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DraftDistribution(_message.Message):
    __slots__ = ("node_index", "token_ids", "probs")
    NODE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    node_index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, node_index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class Tree(_message.Message):
    __slots__ = ("round", "token_ids", "parent_indices", "draw_mode", "distributions")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENT_INDICES_FIELD_NUMBER: _ClassVar[int]
    DRAW_MODE_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    round: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    parent_indices: _containers.RepeatedScalarFieldContainer[int]
    draw_mode: DrawMode
    distributions: _containers.RepeatedCompositeFieldContainer[DraftDistribution]
    def __init__(self, round: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., parent_indices: _Optional[_Iterable[int]] = ..., draw_mode: _Optional[_Union[DrawMode, str]] = ..., distributions: _Optional[_Iterable[_Union[DraftDistribution, _Mapping]]] = ...) -> None: ...

class TargetResponse(_message.Message):
    __slots__ = ("opened", "verdict", "closed")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    verdict: Verdict
    closed: Closed
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., closed: _Optional[_Union[Closed, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "model", "vocab_size", "max_tree_nodes", "max_context_tokens", "eos_token_ids", "last_round", "committed_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    vocab_size: int
    max_tree_nodes: int
    max_context_tokens: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    last_round: int
    committed_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_tree_nodes: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., last_round: _Optional[int] = ..., committed_tokens: _Optional[int] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("round", "accepted_node_indices", "next_token_id", "timings", "replayed")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_NODE_INDICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted_node_indices: _containers.RepeatedScalarFieldContainer[int]
    next_token_id: int
    timings: VerifyTimings
    replayed: bool
    def __init__(self, round: _Optional[int] = ..., accepted_node_indices: _Optional[_Iterable[int]] = ..., next_token_id: _Optional[int] = ..., timings: _Optional[_Union[VerifyTimings, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class VerifyTimings(_message.Message):
    __slots__ = ("queue_ns", "forward_ns", "verify_ns", "commit_ns", "total_ns", "tree_nodes", "batch_sessions", "batch_rows")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_NS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    forward_ns: int
    verify_ns: int
    commit_ns: int
    total_ns: int
    tree_nodes: int
    batch_sessions: int
    batch_rows: int
    def __init__(self, queue_ns: _Optional[int] = ..., forward_ns: _Optional[int] = ..., verify_ns: _Optional[int] = ..., commit_ns: _Optional[int] = ..., total_ns: _Optional[int] = ..., tree_nodes: _Optional[int] = ..., batch_sessions: _Optional[int] = ..., batch_rows: _Optional[int] = ...) -> None: ...

class Closed(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class TargetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TargetStatsResponse(_message.Message):
    __slots__ = ("open_sessions", "cached_tokens", "max_sessions", "max_cached_tokens", "rounds_verified", "evicted_sessions", "draining", "tp_size", "forwards", "rows_forwarded", "batched_rounds", "queued_rounds", "prefilled_tokens")
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FORWARDED_FIELD_NUMBER: _ClassVar[int]
    BATCHED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    open_sessions: int
    cached_tokens: int
    max_sessions: int
    max_cached_tokens: int
    rounds_verified: int
    evicted_sessions: int
    draining: bool
    tp_size: int
    forwards: int
    rows_forwarded: int
    batched_rounds: int
    queued_rounds: int
    prefilled_tokens: int
    def __init__(self, open_sessions: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_cached_tokens: _Optional[int] = ..., rounds_verified: _Optional[int] = ..., evicted_sessions: _Optional[int] = ..., draining: _Optional[bool] = ..., tp_size: _Optional[int] = ..., forwards: _Optional[int] = ..., rows_forwarded: _Optional[int] = ..., batched_rounds: _Optional[int] = ..., queued_rounds: _Optional[int] = ..., prefilled_tokens: _Optional[int] = ...) -> None: ...
