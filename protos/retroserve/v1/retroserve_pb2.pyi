from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrievalMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVAL_MODE_UNSPECIFIED: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_NONE: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_CHUNK: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_TOKEN: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_HYBRID: _ClassVar[RetrievalMode]

class ContextLayout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTEXT_LAYOUT_UNSPECIFIED: _ClassVar[ContextLayout]
    CONTEXT_LAYOUT_PREPEND: _ClassVar[ContextLayout]
    CONTEXT_LAYOUT_AFTER_PROMPT: _ClassVar[ContextLayout]
    CONTEXT_LAYOUT_SUFFIX: _ClassVar[ContextLayout]

class ShardPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARD_POLICY_UNSPECIFIED: _ClassVar[ShardPolicy]
    SHARD_POLICY_PARTIAL: _ClassVar[ShardPolicy]
    SHARD_POLICY_REQUIRE_ALL: _ClassVar[ShardPolicy]

class ShardFailure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARD_FAILURE_UNSPECIFIED: _ClassVar[ShardFailure]
    SHARD_FAILURE_TIMEOUT: _ClassVar[ShardFailure]
    SHARD_FAILURE_UNAVAILABLE: _ClassVar[ShardFailure]
    SHARD_FAILURE_ERROR: _ClassVar[ShardFailure]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_MAX_TOKENS: _ClassVar[StopReason]
    STOP_REASON_EOS_TOKEN: _ClassVar[StopReason]
    STOP_REASON_STOP_SEQUENCE: _ClassVar[StopReason]
    STOP_REASON_TIME_LIMIT: _ClassVar[StopReason]
    STOP_REASON_CANCELLED: _ClassVar[StopReason]
    STOP_REASON_ERROR: _ClassVar[StopReason]
RETRIEVAL_MODE_UNSPECIFIED: RetrievalMode
RETRIEVAL_MODE_NONE: RetrievalMode
RETRIEVAL_MODE_CHUNK: RetrievalMode
RETRIEVAL_MODE_TOKEN: RetrievalMode
RETRIEVAL_MODE_HYBRID: RetrievalMode
CONTEXT_LAYOUT_UNSPECIFIED: ContextLayout
CONTEXT_LAYOUT_PREPEND: ContextLayout
CONTEXT_LAYOUT_AFTER_PROMPT: ContextLayout
CONTEXT_LAYOUT_SUFFIX: ContextLayout
SHARD_POLICY_UNSPECIFIED: ShardPolicy
SHARD_POLICY_PARTIAL: ShardPolicy
SHARD_POLICY_REQUIRE_ALL: ShardPolicy
SHARD_FAILURE_UNSPECIFIED: ShardFailure
SHARD_FAILURE_TIMEOUT: ShardFailure
SHARD_FAILURE_UNAVAILABLE: ShardFailure
SHARD_FAILURE_ERROR: ShardFailure
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_MAX_TOKENS: StopReason
STOP_REASON_EOS_TOKEN: StopReason
STOP_REASON_STOP_SEQUENCE: StopReason
STOP_REASON_TIME_LIMIT: StopReason
STOP_REASON_CANCELLED: StopReason
STOP_REASON_ERROR: StopReason

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "request_id", "sampling", "stopping", "retrieval", "response")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    request_id: str
    sampling: SamplingParameters
    stopping: StoppingCriteria
    retrieval: RetrievalParameters
    response: ResponseOptions
    def __init__(self, prompt: _Optional[str] = ..., request_id: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParameters, _Mapping]] = ..., stopping: _Optional[_Union[StoppingCriteria, _Mapping]] = ..., retrieval: _Optional[_Union[RetrievalParameters, _Mapping]] = ..., response: _Optional[_Union[ResponseOptions, _Mapping]] = ...) -> None: ...

class SamplingParameters(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class StoppingCriteria(_message.Message):
    __slots__ = ("max_new_tokens", "stop_sequences", "time_limit_ms", "include_stop_sequence")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_MS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    stop_sequences: _containers.RepeatedScalarFieldContainer[str]
    time_limit_ms: int
    include_stop_sequence: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., stop_sequences: _Optional[_Iterable[str]] = ..., time_limit_ms: _Optional[int] = ..., include_stop_sequence: _Optional[bool] = ...) -> None: ...

class RetrievalParameters(_message.Message):
    __slots__ = ("mode", "neighbours", "stride", "query_tokens", "return_provenance", "layout", "shard_policy", "knn_lambda", "knn_k", "knn_temperature", "knn_skip_above_prob", "knn_pointer_min", "keep_rank_margin")
    MODE_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SHARD_POLICY_FIELD_NUMBER: _ClassVar[int]
    KNN_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    KNN_K_FIELD_NUMBER: _ClassVar[int]
    KNN_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    KNN_SKIP_ABOVE_PROB_FIELD_NUMBER: _ClassVar[int]
    KNN_POINTER_MIN_FIELD_NUMBER: _ClassVar[int]
    KEEP_RANK_MARGIN_FIELD_NUMBER: _ClassVar[int]
    mode: RetrievalMode
    neighbours: int
    stride: int
    query_tokens: int
    return_provenance: bool
    layout: ContextLayout
    shard_policy: ShardPolicy
    knn_lambda: float
    knn_k: int
    knn_temperature: float
    knn_skip_above_prob: float
    knn_pointer_min: int
    keep_rank_margin: int
    def __init__(self, mode: _Optional[_Union[RetrievalMode, str]] = ..., neighbours: _Optional[int] = ..., stride: _Optional[int] = ..., query_tokens: _Optional[int] = ..., return_provenance: _Optional[bool] = ..., layout: _Optional[_Union[ContextLayout, str]] = ..., shard_policy: _Optional[_Union[ShardPolicy, str]] = ..., knn_lambda: _Optional[float] = ..., knn_k: _Optional[int] = ..., knn_temperature: _Optional[float] = ..., knn_skip_above_prob: _Optional[float] = ..., knn_pointer_min: _Optional[int] = ..., keep_rank_margin: _Optional[int] = ...) -> None: ...

class MissingShard(_message.Message):
    __slots__ = ("shard_index", "address", "reason")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    address: str
    reason: ShardFailure
    def __init__(self, shard_index: _Optional[int] = ..., address: _Optional[str] = ..., reason: _Optional[_Union[ShardFailure, str]] = ...) -> None: ...

class ResponseOptions(_message.Message):
    __slots__ = ("return_token_ids", "return_logprobs")
    RETURN_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    return_token_ids: bool
    return_logprobs: bool
    def __init__(self, return_token_ids: _Optional[bool] = ..., return_logprobs: _Optional[bool] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("chunk_id", "doc_id", "source", "title", "text", "continuation_text", "score", "continuation_id")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_ID_FIELD_NUMBER: _ClassVar[int]
    chunk_id: int
    doc_id: int
    source: str
    title: str
    text: str
    continuation_text: str
    score: float
    continuation_id: int
    def __init__(self, chunk_id: _Optional[int] = ..., doc_id: _Optional[int] = ..., source: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., continuation_text: _Optional[str] = ..., score: _Optional[float] = ..., continuation_id: _Optional[int] = ...) -> None: ...

class Retrieval(_message.Message):
    __slots__ = ("query_text", "start_token", "end_token", "start_char", "end_char", "neighbours", "retrieval_ms", "missing_shards")
    QUERY_TEXT_FIELD_NUMBER: _ClassVar[int]
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    END_TOKEN_FIELD_NUMBER: _ClassVar[int]
    START_CHAR_FIELD_NUMBER: _ClassVar[int]
    END_CHAR_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    query_text: str
    start_token: int
    end_token: int
    start_char: int
    end_char: int
    neighbours: _containers.RepeatedCompositeFieldContainer[Neighbour]
    retrieval_ms: float
    missing_shards: _containers.RepeatedCompositeFieldContainer[MissingShard]
    def __init__(self, query_text: _Optional[str] = ..., start_token: _Optional[int] = ..., end_token: _Optional[int] = ..., start_char: _Optional[int] = ..., end_char: _Optional[int] = ..., neighbours: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., retrieval_ms: _Optional[float] = ..., missing_shards: _Optional[_Iterable[_Union[MissingShard, _Mapping]]] = ...) -> None: ...

class GenerationTiming(_message.Message):
    __slots__ = ("ttft_ms", "total_ms", "retrieval_ms", "retrievals")
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVALS_FIELD_NUMBER: _ClassVar[int]
    ttft_ms: float
    total_ms: float
    retrieval_ms: float
    retrievals: int
    def __init__(self, ttft_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., retrieval_ms: _Optional[float] = ..., retrievals: _Optional[int] = ...) -> None: ...

class PrefixCacheStats(_message.Message):
    __slots__ = ("engine_prompt_tokens", "cached_prompt_tokens", "continued_segments")
    ENGINE_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTINUED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    engine_prompt_tokens: int
    cached_prompt_tokens: int
    continued_segments: int
    def __init__(self, engine_prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., continued_segments: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "generated_token_count", "prompt_token_count", "stop_reason", "stop_sequence", "seed", "retrievals", "token_ids", "logprobs", "timing", "prefix_cache", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RETRIEVALS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    generated_token_count: int
    prompt_token_count: int
    stop_reason: StopReason
    stop_sequence: str
    seed: int
    retrievals: _containers.RepeatedCompositeFieldContainer[Retrieval]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    timing: GenerationTiming
    prefix_cache: PrefixCacheStats
    request_id: str
    def __init__(self, text: _Optional[str] = ..., generated_token_count: _Optional[int] = ..., prompt_token_count: _Optional[int] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., stop_sequence: _Optional[str] = ..., seed: _Optional[int] = ..., retrievals: _Optional[_Iterable[_Union[Retrieval, _Mapping]]] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., timing: _Optional[_Union[GenerationTiming, _Mapping]] = ..., prefix_cache: _Optional[_Union[PrefixCacheStats, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("text", "token_ids", "logprobs", "retrievals", "stop_reason", "stop_sequence", "generated_token_count", "prompt_token_count", "seed", "timing", "prefix_cache", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVALS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    retrievals: _containers.RepeatedCompositeFieldContainer[Retrieval]
    stop_reason: StopReason
    stop_sequence: str
    generated_token_count: int
    prompt_token_count: int
    seed: int
    timing: GenerationTiming
    prefix_cache: PrefixCacheStats
    request_id: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., retrievals: _Optional[_Iterable[_Union[Retrieval, _Mapping]]] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., stop_sequence: _Optional[str] = ..., generated_token_count: _Optional[int] = ..., prompt_token_count: _Optional[int] = ..., seed: _Optional[int] = ..., timing: _Optional[_Union[GenerationTiming, _Mapping]] = ..., prefix_cache: _Optional[_Union[PrefixCacheStats, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("query", "neighbours", "shard_policy")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    SHARD_POLICY_FIELD_NUMBER: _ClassVar[int]
    query: str
    neighbours: int
    shard_policy: ShardPolicy
    def __init__(self, query: _Optional[str] = ..., neighbours: _Optional[int] = ..., shard_policy: _Optional[_Union[ShardPolicy, str]] = ...) -> None: ...

class RetrieveTiming(_message.Message):
    __slots__ = ("embed_ms", "search_ms", "payload_ms", "total_ms")
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    embed_ms: float
    search_ms: float
    payload_ms: float
    total_ms: float
    def __init__(self, embed_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., payload_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("neighbours", "timing", "missing_shards")
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    neighbours: _containers.RepeatedCompositeFieldContainer[Neighbour]
    timing: RetrieveTiming
    missing_shards: _containers.RepeatedCompositeFieldContainer[MissingShard]
    def __init__(self, neighbours: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., timing: _Optional[_Union[RetrieveTiming, _Mapping]] = ..., missing_shards: _Optional[_Iterable[_Union[MissingShard, _Mapping]]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "return_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    return_tokens: bool
    def __init__(self, text: _Optional[str] = ..., return_tokens: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids", "token_count", "tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_count: int
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., token_count: _Optional[int] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "path", "fingerprint", "tokenizer_fingerprint", "quantization", "dtype", "max_model_len", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    fingerprint: str
    tokenizer_fingerprint: str
    quantization: str
    dtype: str
    max_model_len: int
    device: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., fingerprint: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., quantization: _Optional[str] = ..., dtype: _Optional[str] = ..., max_model_len: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class DatastoreInfo(_message.Message):
    __slots__ = ("loaded", "name", "path", "mode", "tokenizer_fingerprint", "document_count", "entry_count", "index_factory", "embedding_dim", "index_dim", "pca_dim", "embedder", "chunk_tokens", "created_at", "shard_addresses", "manifest_digest", "serving_since")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    ENTRY_COUNT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FACTORY_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    INDEX_DIM_FIELD_NUMBER: _ClassVar[int]
    PCA_DIM_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SHARD_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SERVING_SINCE_FIELD_NUMBER: _ClassVar[int]
    loaded: bool
    name: str
    path: str
    mode: str
    tokenizer_fingerprint: str
    document_count: int
    entry_count: int
    index_factory: str
    embedding_dim: int
    index_dim: int
    pca_dim: int
    embedder: str
    chunk_tokens: int
    created_at: str
    shard_addresses: _containers.RepeatedScalarFieldContainer[str]
    manifest_digest: str
    serving_since: str
    def __init__(self, loaded: _Optional[bool] = ..., name: _Optional[str] = ..., path: _Optional[str] = ..., mode: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., document_count: _Optional[int] = ..., entry_count: _Optional[int] = ..., index_factory: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., index_dim: _Optional[int] = ..., pca_dim: _Optional[int] = ..., embedder: _Optional[str] = ..., chunk_tokens: _Optional[int] = ..., created_at: _Optional[str] = ..., shard_addresses: _Optional[_Iterable[str]] = ..., manifest_digest: _Optional[str] = ..., serving_since: _Optional[str] = ...) -> None: ...

class LimitsInfo(_message.Message):
    __slots__ = ("max_prompt_tokens", "max_new_tokens", "default_max_new_tokens", "max_stop_sequences", "max_stop_sequence_chars", "max_queue", "max_time_limit_s", "max_message_bytes", "max_temperature", "max_top_k", "max_query_chars", "max_tokenize_chars", "max_streams_per_client")
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_SEQUENCE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_TIME_LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENIZE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    max_prompt_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    max_stop_sequences: int
    max_stop_sequence_chars: int
    max_queue: int
    max_time_limit_s: float
    max_message_bytes: int
    max_temperature: float
    max_top_k: int
    max_query_chars: int
    max_tokenize_chars: int
    max_streams_per_client: int
    def __init__(self, max_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., default_max_new_tokens: _Optional[int] = ..., max_stop_sequences: _Optional[int] = ..., max_stop_sequence_chars: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_time_limit_s: _Optional[float] = ..., max_message_bytes: _Optional[int] = ..., max_temperature: _Optional[float] = ..., max_top_k: _Optional[int] = ..., max_query_chars: _Optional[int] = ..., max_tokenize_chars: _Optional[int] = ..., max_streams_per_client: _Optional[int] = ...) -> None: ...

class RetrievalDefaultsInfo(_message.Message):
    __slots__ = ("mode", "neighbours", "max_neighbours", "stride", "min_stride", "max_stride", "query_tokens", "max_query_tokens", "layout", "available_modes", "shard_policy", "knn_lambda", "knn_k", "max_knn_k", "knn_temperature", "knn_skip_above_prob", "knn_pointer_min", "keep_same_neighbours", "keep_rank_margin", "retriever", "neighbour_tokens")
    MODE_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    MIN_STRIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_STRIDE_FIELD_NUMBER: _ClassVar[int]
    QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MODES_FIELD_NUMBER: _ClassVar[int]
    SHARD_POLICY_FIELD_NUMBER: _ClassVar[int]
    KNN_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    KNN_K_FIELD_NUMBER: _ClassVar[int]
    MAX_KNN_K_FIELD_NUMBER: _ClassVar[int]
    KNN_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    KNN_SKIP_ABOVE_PROB_FIELD_NUMBER: _ClassVar[int]
    KNN_POINTER_MIN_FIELD_NUMBER: _ClassVar[int]
    KEEP_SAME_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    KEEP_RANK_MARGIN_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOUR_TOKENS_FIELD_NUMBER: _ClassVar[int]
    mode: RetrievalMode
    neighbours: int
    max_neighbours: int
    stride: int
    min_stride: int
    max_stride: int
    query_tokens: int
    max_query_tokens: int
    layout: ContextLayout
    available_modes: _containers.RepeatedScalarFieldContainer[RetrievalMode]
    shard_policy: ShardPolicy
    knn_lambda: float
    knn_k: int
    max_knn_k: int
    knn_temperature: float
    knn_skip_above_prob: float
    knn_pointer_min: int
    keep_same_neighbours: bool
    keep_rank_margin: int
    retriever: str
    neighbour_tokens: int
    def __init__(self, mode: _Optional[_Union[RetrievalMode, str]] = ..., neighbours: _Optional[int] = ..., max_neighbours: _Optional[int] = ..., stride: _Optional[int] = ..., min_stride: _Optional[int] = ..., max_stride: _Optional[int] = ..., query_tokens: _Optional[int] = ..., max_query_tokens: _Optional[int] = ..., layout: _Optional[_Union[ContextLayout, str]] = ..., available_modes: _Optional[_Iterable[_Union[RetrievalMode, str]]] = ..., shard_policy: _Optional[_Union[ShardPolicy, str]] = ..., knn_lambda: _Optional[float] = ..., knn_k: _Optional[int] = ..., max_knn_k: _Optional[int] = ..., knn_temperature: _Optional[float] = ..., knn_skip_above_prob: _Optional[float] = ..., knn_pointer_min: _Optional[int] = ..., keep_same_neighbours: _Optional[bool] = ..., keep_rank_margin: _Optional[int] = ..., retriever: _Optional[str] = ..., neighbour_tokens: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "datastore", "limits", "retrieval_defaults", "version", "token_datastore")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASTORE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DATASTORE_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    datastore: DatastoreInfo
    limits: LimitsInfo
    retrieval_defaults: RetrievalDefaultsInfo
    version: str
    token_datastore: DatastoreInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., datastore: _Optional[_Union[DatastoreInfo, _Mapping]] = ..., limits: _Optional[_Union[LimitsInfo, _Mapping]] = ..., retrieval_defaults: _Optional[_Union[RetrievalDefaultsInfo, _Mapping]] = ..., version: _Optional[str] = ..., token_datastore: _Optional[_Union[DatastoreInfo, _Mapping]] = ...) -> None: ...
