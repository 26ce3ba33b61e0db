"""Typed Python client for genserve (sync and async, httpx): see README.md."""

from genserve_client.client import AsyncClient, Client, encode_image
from genserve_client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    DeadlineExceededError,
    GenServeError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    ServiceUnavailableError,
    StreamError,
    UnsupportedMediaTypeError,
)
from genserve_client.types import (
    Event,
    GenerationResult,
    Image,
    LatentResult,
    ModelInfo,
    Models,
    Preview,
    Progress,
    Result,
    Tensor,
)

__all__ = [
    "APIConnectionError", "APIError", "AsyncClient", "AuthenticationError", "Client", "DeadlineExceededError",
    "Event", "GenServeError", "GenerationResult", "Image", "InvalidRequestError", "LatentResult", "ModelInfo",
    "Models", "NotFoundError", "PayloadTooLargeError", "Preview", "Progress", "RateLimitError",
    "RequestTimeoutError", "Result", "ServerError", "ServiceUnavailableError", "StreamError", "Tensor",
    "UnsupportedMediaTypeError", "encode_image",
]
