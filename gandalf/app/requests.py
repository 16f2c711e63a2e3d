"""Client request bodies of the OpenAI endpoints, decoded and checked once.

The handlers call these; every failure is a 400 in OpenAI's shape naming the
parameter (:func:`gandalf.errors.decode_body` for the JSON itself: bad JSON,
nesting too deep, invalid UTF-8, wrong types, and the size bounds declared on
:class:`~gandalf.domain.ChatRequest` and
:class:`~gandalf.domain.EmbeddingsRequest`).
"""

from __future__ import annotations

import msgspec

from gandalf.domain import (
    ChatRequest,
    EmbeddingsInput,
    EmbeddingsRequest,
    embeddings_input_problem,
)
from gandalf.errors import InvalidRequest, check_utf8, decode_body, decode_error, invalid_body

__all__ = ["decode_chat", "decode_embeddings"]

_chat = msgspec.json.Decoder(ChatRequest)
_embeddings = msgspec.json.Decoder(EmbeddingsRequest)
_embeddings_input: msgspec.json.Decoder[EmbeddingsInput] = msgspec.json.Decoder(EmbeddingsInput)


def decode_chat(body: bytes) -> ChatRequest:
    """A chat completion body: the view the gateway routes on. The hot path:
    :func:`~gandalf.errors.decode_body` written out, one call fewer."""
    try:
        chat = _chat.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        raise decode_error(exc) from None
    if not body.isascii():
        check_utf8(body)
    if not chat.messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    return chat


def decode_embeddings(body: bytes) -> EmbeddingsRequest:
    """An embeddings body, its ``input`` checked for shape and size (at most
    2048 items, each string or token array bounded, one kind per list)."""
    embed = decode_body(_embeddings, body)
    try:
        # The body decoded already: this cannot fail on syntax, depth or UTF-8.
        value = _embeddings_input.decode(embed.input)
    except msgspec.ValidationError as exc:
        error = invalid_body(exc)
        # msgspec names the path inside the value: it is all 'input'.
        where = f"input{error.param}" if error.param and error.param.startswith("[") else "input"
        raise InvalidRequest(
            f"Invalid 'input' at '{where}': {error.message.rsplit(': ', 1)[-1]}", param="input"
        ) from None
    problem = embeddings_input_problem(value)
    if problem is not None:
        raise InvalidRequest(f"Invalid 'input': {problem}.", param="input")
    return embed
