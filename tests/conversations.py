"""Hypothesis strategies: random valid OpenAI chat conversations.

A conversation is what a real client sends: optional system/developer
messages, then turns where an assistant may call tools and every call gets
its tool message (with the call's id) before the next user message. Texts
are any Unicode (no lone surrogates: JSON cannot carry them), sometimes
empty or whitespace; user turns sometimes use content parts with images.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import strategies as st

texts = st.text(max_size=40)
nonblank = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != "")
# Names the providers accept for functions: [a-zA-Z_][a-zA-Z0-9_]{0,30}
names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,30}", fullmatch=True)
json_scalars = st.none() | st.booleans() | st.integers(-(2**31), 2**31) | texts
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nonblank, inner, max_size=3),
    max_leaves=6,
)
arguments = st.dictionaries(names, json_values, max_size=4)
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAF"
    "BQIAX8jx0gAAAABJRU5ErkJggg=="
)


@st.composite
def user_message(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {"role": "user", "content": draw(texts)}
    parts: list[dict[str, Any]] = draw(
        st.lists(
            st.one_of(
                texts.map(lambda t: {"type": "text", "text": t}),
                st.just({"type": "image_url", "image_url": {"url": PNG}}),
            ),
            min_size=1,
            max_size=3,
        )
    )
    return {"role": "user", "content": parts}


@st.composite
def tool_round(draw: st.DrawFn, counter: list[int]) -> list[dict[str, Any]]:
    """An assistant message calling 1-3 tools, then one tool message per call."""
    calls = []
    for _ in range(draw(st.integers(1, 3))):
        counter[0] += 1
        calls.append(
            {
                "id": f"call_{counter[0]}",
                "type": "function",
                "function": {
                    "name": draw(names),
                    "arguments": orjson.dumps(draw(arguments)).decode(),
                },
            }
        )
    assistant: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
    assistant["content"] = draw(st.none() | texts)
    results = [
        {"role": "tool", "tool_call_id": call["id"], "content": draw(texts)} for call in calls
    ]
    return [assistant, *results]


@st.composite
def conversations(draw: st.DrawFn) -> dict[str, Any]:
    """A chat completion request body (as a dict) with a random valid history."""
    messages: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 2))):
        role = draw(st.sampled_from(["system", "developer"]))
        messages.append({"role": role, "content": draw(texts)})
    counter = [0]
    for _ in range(draw(st.integers(1, 4))):
        messages.append(draw(user_message()))
        kind = draw(st.sampled_from(["text", "tools", "none"]))
        if kind == "text":
            messages.append({"role": "assistant", "content": draw(texts)})
        elif kind == "tools":
            messages.extend(draw(tool_round(counter)))
    request: dict[str, Any] = {"model": "m", "messages": messages}
    if draw(st.booleans()):
        request["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": draw(texts),
                    "parameters": {"type": "object", "properties": {}},
                },
            }
            for name in draw(st.lists(names, min_size=1, max_size=3, unique=True))
        ]
    if draw(st.booleans()):
        request["temperature"] = draw(st.floats(0, 2))
    if draw(st.booleans()):
        request["max_tokens"] = draw(st.integers(1, 8192))
    if draw(st.booleans()):
        request["stop"] = draw(st.lists(nonblank, min_size=1, max_size=4))
    return request


def user_visible_texts(request: dict[str, Any]) -> list[str]:
    """The non-blank texts of user, assistant and tool messages, in order."""
    out: list[str] = []
    for message in request["messages"]:
        if message["role"] in ("system", "developer"):
            continue
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(part["text"] for part in content if part["type"] == "text")
    return [text for text in out if text.strip()]


def system_texts(request: dict[str, Any]) -> list[str]:
    return [
        m["content"]
        for m in request["messages"]
        if m["role"] in ("system", "developer") and m["content"].strip()
    ]


def tool_arguments(request: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(id, name, parsed arguments) of every assistant tool call, in order."""
    return [
        (call["id"], call["function"]["name"], orjson.loads(call["function"]["arguments"]))
        for message in request["messages"]
        for call in message.get("tool_calls") or ()
    ]
