"""The README's provider matrix is this table, and every row names the tests
that back it: the README cannot claim what no test shows.

Cells: "native" = relayed as the client sent it (OpenAI's own wire format);
anything else says how Gandalf translates it, "ignored" (the answer keeps its
meaning without it) or "400" (refused, naming the parameter and provider).
"""

from __future__ import annotations

import importlib
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- provider-matrix:start -->"
END = "<!-- provider-matrix:end -->"
PROVIDERS = ("openai", "anthropic", "gemini", "ollama", "azure")

# feature, cells per provider (in PROVIDERS order), backing tests ("module::function")
MATRIX: list[tuple[str, tuple[str, str, str, str, str], tuple[str, ...]]] = [
    (
        "chat completions",
        ("native", "Messages API", "generateContent", "native (`/v1`)", "deployment URL"),
        (
            "test_e2e::test_upstream_success_and_what_the_upstream_received",
            "test_providers_e2e::test_anthropic_chat",
            "test_providers_e2e::test_gemini_chat_and_stream",
            "test_providers_e2e::test_ollama_models_are_discovered_and_served",
            "test_azure::test_chat_stream_and_embeddings_at_deployment_urls",
        ),
    ),
    (
        "system / developer messages",
        ("native", "`system`", "`systemInstruction`", "native", "native"),
        (
            "test_anthropic::test_request_golden",
            "test_gemini::test_request_golden",
            "test_translation_properties::test_any_conversation_translates_to_anthropic_keeping_its_text",
            "test_translation_properties::test_any_conversation_translates_to_gemini_keeping_its_text",
        ),
    ),
    (
        "multi-turn history",
        ("native", "same-role turns merged", "same-role turns merged", "native", "native"),
        (
            "test_anthropic::test_every_golden_translation_is_accepted_by_the_mock",
            "test_translation_properties::test_any_conversation_translates_to_anthropic_keeping_its_text",
            "test_translation_properties::test_any_conversation_translates_to_gemini_keeping_its_text",
        ),
    ),
    (
        "images as `data:` URLs",
        ("native", "base64 source", "`inlineData`", "native", "native"),
        ("test_anthropic::test_request_golden", "test_gemini::test_request_golden"),
    ),
    (
        "images as http(s) URLs",
        ("native", "url source", "400", "native", "native"),
        (
            "test_anthropic::test_request_golden",
            "test_gemini::test_http_image_urls_say_to_send_data_urls",
        ),
    ),
    (
        "`tools`, `tool_choice`",
        (
            "native",
            "`tool_use`, `tool_choice`",
            "`functionDeclarations`, `toolConfig`",
            "native",
            "native",
        ),
        (
            "test_providers_e2e::test_anthropic_tools_round_trip_plain_and_streamed",
            "test_providers_e2e::test_gemini_tools_round_trip_keeps_the_thought_signature",
            "test_gemini::test_tool_choice",
        ),
    ),
    (
        "tool results",
        ("native", "`tool_result` blocks", "`functionResponse` parts", "native", "native"),
        (
            "test_anthropic::test_tool_results_round_trip",
            "test_gemini::test_tool_calls_round_trip_with_their_signature",
        ),
    ),
    (
        "`parallel_tool_calls: false`",
        ("native", "`disable_parallel_tool_use`", "ignored", "native", "native"),
        (
            "test_anthropic::test_request_golden",
            "test_gemini::test_harmless_parameters_are_ignored",
        ),
    ),
    (
        "`response_format` json_object",
        ("native", "forced tool", "`responseMimeType`", "native", "native"),
        (
            "test_anthropic::test_json_mode_streamed_and_not",
            "test_providers_e2e::test_gemini_json_errors_and_embeddings",
        ),
    ),
    (
        "`response_format` json_schema",
        ("native", "forced tool with the schema", "`responseJsonSchema`", "native", "native"),
        ("test_providers_e2e::test_anthropic_json_schema", "test_gemini::test_json_mode"),
    ),
    (
        "`stop`",
        ("native", "`stop_sequences`", "`stopSequences`", "native", "native"),
        (
            "test_anthropic::test_finish_length_and_stop_through_the_mock",
            "test_gemini::test_request_golden",
        ),
    ),
    (
        "`temperature`, `top_p`",
        ("native", "translated", "translated", "native", "native"),
        ("test_anthropic::test_request_golden", "test_gemini::test_request_golden"),
    ),
    (
        "`max_tokens`, `max_completion_tokens`",
        (
            "native",
            "`max_tokens` (default: provider's `max_tokens`, 4096)",
            "`maxOutputTokens`",
            "native",
            "native",
        ),
        (
            "test_anthropic::test_max_tokens_default_comes_from_the_provider",
            "test_gemini::test_request_golden",
        ),
    ),
    (
        "`n` > 1",
        ("native", "400", "`candidateCount`", "native", "native"),
        ("test_providers_e2e::test_anthropic_errors", "test_gemini::test_n_candidates"),
    ),
    (
        "`seed`, `presence_penalty`, `frequency_penalty`",
        ("native", "ignored", "translated", "native", "native"),
        (
            "test_anthropic::test_meaning_changing_parameters_are_refused",
            "test_gemini::test_request_golden",
        ),
    ),
    (
        "`logprobs`, `top_logprobs`, `logit_bias`, audio output",
        ("native", "400", "400", "native", "native"),
        (
            "test_anthropic::test_meaning_changing_parameters_are_refused",
            "test_gemini::test_meaning_changing_parameters_are_refused",
        ),
    ),
    (
        "`user`",
        ("native", "`metadata.user_id`", "ignored", "native", "native"),
        (
            "test_anthropic::test_request_golden",
            "test_gemini::test_harmless_parameters_are_ignored",
        ),
    ),
    (
        "streaming",
        ("native", "translated event by event", "translated chunk by chunk", "native", "native"),
        (
            "test_streaming_e2e::test_chunks_reach_the_client_while_the_upstream_holds_the_rest",
            "test_anthropic::test_each_event_is_translated_as_it_arrives",
            "test_gemini::test_stream_output_goes_out_per_event",
            "test_translation_properties::test_anthropic_streams_reassemble_exactly",
            "test_translation_properties::test_gemini_streams_reassemble_exactly",
        ),
    ),
    (
        "streamed tool calls",
        ("native", "`input_json_delta` fragments", "whole calls", "native", "native"),
        (
            "test_anthropic::test_tool_fragments_concatenate_to_the_full_arguments",
            "test_gemini::test_streamed_tool_calls_round_trip",
        ),
    ),
    (
        "`stream_options.include_usage`",
        ("native", "translated", "translated", "native", "native"),
        (
            "test_anthropic::test_stream_echo_include_usage_on_and_off",
            "test_gemini::test_stream_without_include_usage_has_no_usage_chunk",
        ),
    ),
    (
        "usage: cached prompt tokens",
        (
            "native",
            "cache reads -> `cached_tokens`",
            "`cachedContentTokenCount`",
            "native",
            "native",
        ),
        (
            "test_providers_e2e::test_anthropic_chat",
            "test_providers_e2e::test_gemini_thinking_usage",
        ),
    ),
    (
        "usage: reasoning tokens",
        (
            "native",
            "in `completion_tokens`",
            "`thoughtsTokenCount` -> `reasoning_tokens`",
            "native",
            "native",
        ),
        (
            "test_anthropic::test_thinking_is_not_shown",
            "test_providers_e2e::test_gemini_thinking_usage",
        ),
    ),
    (
        "finish reasons",
        ("native", "translated", "translated", "native", "native"),
        (
            "test_anthropic::test_finish_reasons_match_streamed_and_not",
            "test_gemini::test_each_finish_reason",
        ),
    ),
    (
        "embeddings",
        ("native", "400 (no embeddings API)", "`batchEmbedContents`", "native", "native"),
        (
            "test_anthropic::test_embeddings_are_refused",
            "test_gemini::test_embeddings_float_and_base64",
            "test_ollama::test_chat_stream_embeddings_and_tags_through_one_server",
        ),
    ),
    (
        "`/v1/models`",
        ("routes", "routes", "routes", "routes + pulled models (`/api/tags`)", "routes"),
        ("test_ollama::test_gateway_routes_what_ollama_has_pulled",),
    ),
    (
        "upstream errors",
        (
            "relayed",
            "translated (overloaded -> 503)",
            "translated (UNAVAILABLE -> 503)",
            "relayed",
            "relayed",
        ),
        (
            "test_anthropic::test_error_statuses_map_to_the_contract",
            "test_gemini::test_error_mapping",
            "test_providers_e2e::test_anthropic_errors",
        ),
    ),
    (
        "Responses API (`/v1/responses`)",
        (
            "native (`responses: false`: via chat)",
            "via chat: Messages API",
            "via chat: generateContent",
            "via chat (`/v1`)",
            "via chat: deployment URL",
        ),
        (
            "test_responses_e2e::test_create_answers_text_on_every_provider",
            "test_responses_e2e::test_stream_gives_the_typed_events_on_every_provider",
        ),
    ),
    (
        "Responses: function calls and outputs",
        (
            "native",
            "`tool_use` / `tool_result`",
            "`functionCall` / `functionResponse`",
            "via chat",
            "via chat",
        ),
        (
            "test_responses_e2e::test_function_calling_round_trip",
            "test_responses_e2e::test_streamed_function_call",
            "test_responses_wire::test_items_become_chat_messages",
        ),
    ),
    (
        "Responses: `text.format` (`responses.parse`)",
        ("native", "forced tool with the schema", "`responseJsonSchema`", "via chat", "via chat"),
        (
            "test_responses_e2e::test_parse_with_a_pydantic_model",
            "test_responses_wire::test_options_become_chat_options",
        ),
    ),
    (
        "Responses: `reasoning.effort`",
        ("native", "400", "400", "400", "`reasoning_effort`"),
        (
            "test_responses_e2e::test_reasoning_effort_on_a_provider_without_it_is_a_400",
            "test_responses_wire::test_options_become_chat_options",
        ),
    ),
    (
        "Responses: `store`, `previous_response_id`, GET / DELETE",
        (
            "kept by Gandalf",
            "kept by Gandalf",
            "kept by Gandalf",
            "kept by Gandalf",
            "kept by Gandalf",
        ),
        (
            "test_responses_e2e::test_previous_response_id_continues_on_any_provider",
            "test_responses_e2e::test_retrieve_and_delete",
            "test_responses_e2e::test_a_key_cannot_reach_another_keys_response",
        ),
    ),
    (
        "Responses: built-in tools (web search, file search, ...)",
        ("400", "400", "400", "400", "400"),
        ("test_responses_e2e::test_bad_input_is_a_400_naming_it",),
    ),
]


def render() -> str:
    lines = [
        "| feature | " + " | ".join(PROVIDERS) + " |",
        "|---" * (len(PROVIDERS) + 1) + "|",
    ]
    lines += [f"| {feature} | " + " | ".join(cells) + " |" for feature, cells, _ in MATRIX]
    return "\n".join(lines)


def test_readme_shows_this_matrix() -> None:
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, "README.md lost its provider matrix markers"
    shown = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert shown == render(), (
        "README.md's provider matrix differs; paste render() between the markers"
    )


def test_every_row_is_backed_by_tests_that_exist() -> None:
    for feature, _, tests in MATRIX:
        assert tests, feature
        for ref in tests:
            module_name, function = ref.split("::")
            module = importlib.import_module(f"tests.{module_name}")
            assert callable(getattr(module, function, None)), f"{feature}: {ref} does not exist"
