from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABELS_PNG: _ClassVar[OutputFormat]
    LABELS_RAW: _ClassVar[OutputFormat]
    OVERLAY_JPEG: _ClassVar[OutputFormat]
    STATS_ONLY: _ClassVar[OutputFormat]

class DropPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DROP_POLICY_UNSPECIFIED: _ClassVar[DropPolicy]
    DROP_POLICY_LATEST: _ClassVar[DropPolicy]
    DROP_POLICY_BLOCK: _ClassVar[DropPolicy]
LABELS_PNG: OutputFormat
LABELS_RAW: OutputFormat
OVERLAY_JPEG: OutputFormat
STATS_ONLY: OutputFormat
DROP_POLICY_UNSPECIFIED: DropPolicy
DROP_POLICY_LATEST: DropPolicy
DROP_POLICY_BLOCK: DropPolicy

class RawFrame(_message.Message):
    __slots__ = ("height", "width", "rgb")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    RGB_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    rgb: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., rgb: _Optional[bytes] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("model", "encoded", "raw", "frame_id", "format", "deadline_ms", "drop_policy", "max_in_flight", "tta", "priority")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    DROP_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TTA_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    encoded: bytes
    raw: RawFrame
    frame_id: int
    format: OutputFormat
    deadline_ms: int
    drop_policy: DropPolicy
    max_in_flight: int
    tta: str
    priority: int
    def __init__(self, model: _Optional[str] = ..., encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawFrame, _Mapping]] = ..., frame_id: _Optional[int] = ..., format: _Optional[_Union[OutputFormat, str]] = ..., deadline_ms: _Optional[int] = ..., drop_policy: _Optional[_Union[DropPolicy, str]] = ..., max_in_flight: _Optional[int] = ..., tta: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "inference_ms", "encode_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    inference_ms: float
    encode_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "message", "status", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    status: int
    retry_after_ms: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., status: _Optional[int] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("frame_id", "model", "height", "width", "format", "labels", "class_pixels", "timings", "batch_size", "frames_dropped", "dropped_frame_ids", "error", "tta")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CLASS_PIXELS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FRAME_IDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TTA_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    model: str
    height: int
    width: int
    format: OutputFormat
    labels: bytes
    class_pixels: _containers.RepeatedScalarFieldContainer[int]
    timings: Timings
    batch_size: int
    frames_dropped: int
    dropped_frame_ids: _containers.RepeatedScalarFieldContainer[int]
    error: FrameError
    tta: str
    def __init__(self, frame_id: _Optional[int] = ..., model: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., format: _Optional[_Union[OutputFormat, str]] = ..., labels: _Optional[bytes] = ..., class_pixels: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., batch_size: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., dropped_frame_ids: _Optional[_Iterable[int]] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ..., tta: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Colour(_message.Message):
    __slots__ = ("r", "g", "b")
    R_FIELD_NUMBER: _ClassVar[int]
    G_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    r: int
    g: int
    b: int
    def __init__(self, r: _Optional[int] = ..., g: _Optional[int] = ..., b: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "arch", "weights", "classes", "palette", "ready", "dtype", "cuda_graphs", "published_miou")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    PALETTE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_MIOU_FIELD_NUMBER: _ClassVar[int]
    name: str
    arch: str
    weights: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    palette: _containers.RepeatedCompositeFieldContainer[Colour]
    ready: bool
    dtype: str
    cuda_graphs: bool
    published_miou: float
    def __init__(self, name: _Optional[str] = ..., arch: _Optional[str] = ..., weights: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., palette: _Optional[_Iterable[_Union[Colour, _Mapping]]] = ..., ready: _Optional[bool] = ..., dtype: _Optional[str] = ..., cuda_graphs: _Optional[bool] = ..., published_miou: _Optional[float] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model", "auto_menu")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    AUTO_MENU_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    auto_menu: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., auto_menu: _Optional[_Iterable[str]] = ...) -> None: ...
