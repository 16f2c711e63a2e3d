"""A minimal OpenAI Responses API (``POST /v1/responses``) for the mock
upstream (tests/upstream.py), answered by the requested ``model``:

- ``resp-tools``: a ``function_call`` of ``get_weather`` ({"city": "Paris"},
  call id :data:`CALL_ID`); when the input's last item is a
  ``function_call_output``, the text ``"Results: "`` + its output instead;
- ``resp-json``: the text ``{"echo": <last user text>}``;
- ``status-NNN``: HTTP NNN with an OpenAI-shaped error;
- anything else: the last user text, echoed (``"echo: " + text``).

With ``"stream": true`` the same Response is sent as the API's typed events
(``response.created`` ... ``response.completed``, text deltas word by word).
Usage: about four characters a token.
"""

from __future__ import annotations

import json
from typing import Any

CALL_ID = "call_mock_weather"
_CREATED = 1700000000


def _texts(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def last_user_text(payload: dict[str, Any]) -> str:
    items = payload.get("input")
    if isinstance(items, str):
        return items
    for item in reversed(items or []):
        if isinstance(item, dict) and item.get("role") == "user":
            return _texts(item.get("content"))
    return ""


def _message(text: str, n: int) -> dict[str, Any]:
    return {
        "id": f"msg_mock{n}",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def answer(payload: dict[str, Any], number: int) -> dict[str, Any]:
    """The Response the mock gives ``payload`` (its ``number``-th answer)."""
    model = str(payload.get("model", ""))
    items = payload.get("input")
    last = items[-1] if isinstance(items, list) and items else {}
    output: list[dict[str, Any]]
    if model == "resp-tools" and not (
        isinstance(last, dict) and last.get("type") == "function_call_output"
    ):
        output = [
            {
                "id": f"fc_mock{number}",
                "type": "function_call",
                "status": "completed",
                "call_id": CALL_ID,
                "name": "get_weather",
                "arguments": json.dumps({"city": "Paris"}),
            }
        ]
    elif model == "resp-tools":
        output = [_message("Results: " + _texts(last.get("output")), number)]
    elif model == "resp-json":
        output = [_message(json.dumps({"echo": last_user_text(payload)}), number)]
    else:
        output = [_message("echo: " + last_user_text(payload), number)]
    text = "".join(_texts(o.get("content")) + o.get("arguments", "") for o in output)
    prompt = max(1, len(json.dumps(items)) // 4)
    completion = max(1, len(text) // 4)
    return {
        "id": f"resp_mock{number}",
        "object": "response",
        "created_at": _CREATED,
        "status": "completed",
        "model": model,
        "output": output,
        "instructions": payload.get("instructions"),
        "tools": payload.get("tools") or [],
        "tool_choice": payload.get("tool_choice") or "auto",
        "parallel_tool_calls": True,
        "text": payload.get("text") or {"format": {"type": "text"}},
        "store": payload.get("store", True),
        "metadata": payload.get("metadata") or {},
        "previous_response_id": payload.get("previous_response_id"),
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        },
    }


def events(response: dict[str, Any]) -> list[bytes]:
    """``response`` as the API streams it."""
    out: list[dict[str, Any]] = []
    start = {**response, "status": "in_progress", "output": [], "usage": None}
    out.append({"type": "response.created", "response": start})
    out.append({"type": "response.in_progress", "response": start})
    for index, item in enumerate(response["output"]):
        if item["type"] == "message":
            text = item["content"][0]["text"]
            out.append(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, "status": "in_progress", "content": []},
                }
            )
            ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
            empty = {"type": "output_text", "text": "", "annotations": []}
            out.append({"type": "response.content_part.added", **ids, "part": empty})
            for word in text.split(" "):
                piece = word if word == text.split(" ")[-1] else word + " "
                delta = {"type": "response.output_text.delta", **ids, "delta": piece}
                out.append({**delta, "logprobs": []})
            out.append({"type": "response.output_text.done", **ids, "text": text, "logprobs": []})
            out.append({"type": "response.content_part.done", **ids, "part": item["content"][0]})
        else:
            out.append(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, "status": "in_progress", "arguments": ""},
                }
            )
            ids = {"item_id": item["id"], "output_index": index}
            args = item["arguments"]
            out.append({"type": "response.function_call_arguments.delta", **ids, "delta": args})
            out.append({"type": "response.function_call_arguments.done", **ids, "arguments": args})
        out.append({"type": "response.output_item.done", "output_index": index, "item": item})
    out.append({"type": "response.completed", "response": response})
    return [
        b"event: "
        + e["type"].encode()
        + b"\ndata: "
        + json.dumps({**e, "sequence_number": n}).encode()
        + b"\n\n"
        for n, e in enumerate(out)
    ]
