from retroserve.v1 import retroserve_pb2 as _retroserve_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueryTexts(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class QueryEmbeddings(_message.Message):
    __slots__ = ("dim", "values")
    DIM_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    dim: int
    values: bytes
    def __init__(self, dim: _Optional[int] = ..., values: _Optional[bytes] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("texts", "embeddings", "k")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    texts: QueryTexts
    embeddings: QueryEmbeddings
    k: int
    def __init__(self, texts: _Optional[_Union[QueryTexts, _Mapping]] = ..., embeddings: _Optional[_Union[QueryEmbeddings, _Mapping]] = ..., k: _Optional[int] = ...) -> None: ...

class ShardNeighbour(_message.Message):
    __slots__ = ("neighbour", "chunk_tokens", "continuation_tokens")
    NEIGHBOUR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    neighbour: _retroserve_pb2.Neighbour
    chunk_tokens: _containers.RepeatedScalarFieldContainer[int]
    continuation_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, neighbour: _Optional[_Union[_retroserve_pb2.Neighbour, _Mapping]] = ..., chunk_tokens: _Optional[_Iterable[int]] = ..., continuation_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class QueryNeighbours(_message.Message):
    __slots__ = ("neighbours",)
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    neighbours: _containers.RepeatedCompositeFieldContainer[ShardNeighbour]
    def __init__(self, neighbours: _Optional[_Iterable[_Union[ShardNeighbour, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "timing", "shard_index")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[QueryNeighbours]
    timing: _retroserve_pb2.RetrieveTiming
    shard_index: int
    def __init__(self, results: _Optional[_Iterable[_Union[QueryNeighbours, _Mapping]]] = ..., timing: _Optional[_Union[_retroserve_pb2.RetrieveTiming, _Mapping]] = ..., shard_index: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("shard_index", "shard_count", "name", "parent_name", "parent_index_sha256", "trained_index_sha256", "tokenizer_fingerprint", "embedder", "embedder_backend", "embedding_dim", "index_factory", "chunk_count", "document_count", "first_chunk_id", "end_chunk_id", "manifest_json", "max_queries", "max_k")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PARENT_INDEX_SHA256_FIELD_NUMBER: _ClassVar[int]
    TRAINED_INDEX_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_BACKEND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FACTORY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    END_CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERIES_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    shard_count: int
    name: str
    parent_name: str
    parent_index_sha256: str
    trained_index_sha256: str
    tokenizer_fingerprint: str
    embedder: str
    embedder_backend: str
    embedding_dim: int
    index_factory: str
    chunk_count: int
    document_count: int
    first_chunk_id: int
    end_chunk_id: int
    manifest_json: str
    max_queries: int
    max_k: int
    def __init__(self, shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., name: _Optional[str] = ..., parent_name: _Optional[str] = ..., parent_index_sha256: _Optional[str] = ..., trained_index_sha256: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., embedder: _Optional[str] = ..., embedder_backend: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., index_factory: _Optional[str] = ..., chunk_count: _Optional[int] = ..., document_count: _Optional[int] = ..., first_chunk_id: _Optional[int] = ..., end_chunk_id: _Optional[int] = ..., manifest_json: _Optional[str] = ..., max_queries: _Optional[int] = ..., max_k: _Optional[int] = ...) -> None: ...
