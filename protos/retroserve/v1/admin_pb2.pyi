from retroserve.v1 import retroserve_pb2 as _retroserve_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReloadDatastoreRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ReloadDatastoreResponse(_message.Message):
    __slots__ = ("datastore", "previous", "load_ms")
    DATASTORE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    datastore: _retroserve_pb2.DatastoreInfo
    previous: _retroserve_pb2.DatastoreInfo
    load_ms: float
    def __init__(self, datastore: _Optional[_Union[_retroserve_pb2.DatastoreInfo, _Mapping]] = ..., previous: _Optional[_Union[_retroserve_pb2.DatastoreInfo, _Mapping]] = ..., load_ms: _Optional[float] = ...) -> None: ...
