"""Request fields -> the one grammar a request's output must match: OpenAI's `response_format`, vLLM's
`structured_outputs` and `guided_*`, and a forced tool call (`tool_choice: required` or a named function,
through the schemas vLLM uses). Schemas are checked against their JSON Schema meta-schema (jsonschema) and
compiled on the tokenizer thread, so a bad one is a 400 naming its field and the engine thread never compiles."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from r1deploy.server.errors import APIError
from r1deploy.server.protocol import ChatCompletionRequest, NamedToolChoice, SamplingRequest
from r1deploy.structured import StructuredOutputsParams

_STRUCTURED_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def _schema(value: Any, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise APIError(400, f"{param}: not valid JSON ({exc})", param=param) from exc
    if not isinstance(value, dict):
        raise APIError(400, f"{param}: a JSON schema must be an object", param=param)
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as exc:
        raise APIError(400, f"{param}: not a valid JSON schema: {exc.message}", param=param) from exc
    return value


def forced_tool_schema(body: ChatCompletionRequest) -> dict[str, Any] | None:
    """The schema a forced tool call must match: a named function's arguments, or (required) a list of
    {"name", "parameters"} objects, one item at most without parallel_tool_calls. None when not forced."""
    choice = body.tool_choice
    if not (choice == "required" or isinstance(choice, NamedToolChoice)):
        return None
    if not body.tools:
        raise APIError(400, "tool_choice: forcing a tool call needs `tools`", param="tool_choice")

    def parameters(tool: Any) -> dict[str, Any]:
        return tool.function.parameters or {"type": "object"}

    if isinstance(choice, NamedToolChoice):
        name = choice.function.get("name")
        for tool in body.tools:
            if tool.function.name == name:
                return parameters(tool)
        raise APIError(400, f"tool_choice: no tool named {name!r} in `tools`", param="tool_choice")
    items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                               "parameters": parameters(t)},
              "required": ["name", "parameters"]} for t in body.tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not body.parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def structured_spec(body: SamplingRequest, after_reasoning: bool) -> tuple[StructuredOutputsParams | None, str]:
    """(the grammar, the request field it came from); (None, "") when the output is free."""
    sources: list[tuple[str, dict[str, Any]]] = []
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type == "json_object":
        sources.append(("response_format", {"json_object": True}))
    elif response_format is not None and response_format.type == "json_schema":
        spec = response_format.json_schema
        if spec is None or spec.schema_ is None:
            raise APIError(400, "response_format: json_schema needs `json_schema.schema`", param="response_format")
        sources.append(("response_format", {"json": _schema(spec.schema_, "response_format.json_schema.schema"),
                                            "strict": spec.strict is not False}))
    if body.guided_json is not None:
        sources.append(("guided_json", {"json": _schema(body.guided_json, "guided_json")}))
    for field, key in (("guided_regex", "regex"), ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        if getattr(body, field) is not None:
            sources.append((field, {key: getattr(body, field)}))
    if body.structured_outputs is not None:
        given = {k: v for k, v in body.structured_outputs.items() if v is not None and v is not False}
        unknown = sorted(set(given) - set(_STRUCTURED_KEYS))
        if unknown or len(given) != 1:
            raise APIError(400, f"structured_outputs: give exactly one of {list(_STRUCTURED_KEYS)}"
                                + (f" (unknown: {unknown})" if unknown else ""), param="structured_outputs")
        if "json" in given:
            given["json"] = _schema(given["json"], "structured_outputs.json")
        sources.append(("structured_outputs", given))
    if isinstance(body, ChatCompletionRequest):
        forced = forced_tool_schema(body)
        if forced is not None:
            sources.append(("tool_choice", {"json": forced}))
    if not sources:
        return None, ""
    if len(sources) > 1:
        raise APIError(400, f"{sources[1][0]}: only one output constraint per request (also {sources[0][0]})",
                       param=sources[1][0])
    field, kwargs = sources[0]
    try:
        return StructuredOutputsParams(**kwargs, after_reasoning=after_reasoning), field
    except (ValueError, TypeError) as exc:
        raise APIError(400, f"{field}: {exc}", param=field) from exc
