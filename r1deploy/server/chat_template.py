"""From a chat request to the chat template's inputs: messages (tool calls and tool results included),
tools, and the template kwargs a request may set.

Tools go to the template (transformers' `apply_chat_template(tools=...)`) when it uses them; a template that
knows no tools (SmolLM2's) gets them as a `<tool_call>` system prompt instead, with past calls and results
written the same way, so tool_parsers.HermesToolParser reads the answer.
"""

from __future__ import annotations

import json
from typing import Any

from r1deploy.server.errors import APIError
from r1deploy.server.protocol import ChatCompletionRequest, ChatMessage

# Template switches a request may set: thinking on/off (DeepSeek-V3.1's `thinking`, Qwen3's
# `enable_thinking`). Anything else could reach template internals, so it is refused.
ALLOWED_TEMPLATE_KWARGS = frozenset({"thinking", "enable_thinking"})

TOOL_PROMPT = ("# Tools\n\nYou may call one or more functions to assist with the user query. The functions are "
               "listed within <tools></tools>:\n<tools>\n{tools}\n</tools>\n\nFor each function call, answer with "
               "a JSON object holding the function name and its arguments within <tool_call></tool_call> tags:\n"
               '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def template_kwargs(body: ChatCompletionRequest, defaults: dict[str, Any]) -> dict[str, Any]:
    """--default-chat-template-kwargs, then the request's allow-listed ones over them."""
    requested = body.chat_template_kwargs or {}
    for key, value in requested.items():
        if key not in ALLOWED_TEMPLATE_KWARGS:
            raise APIError(400, f"chat_template_kwargs: {key!r} is not allowed; allowed: "
                                f"{sorted(ALLOWED_TEMPLATE_KWARGS)}", param="chat_template_kwargs")
        if not isinstance(value, bool):
            raise APIError(400, f"chat_template_kwargs: {key!r} must be true or false",
                           param="chat_template_kwargs")
    return {**defaults, **requested}


def uses_tools(template: str) -> bool:
    return "tools" in template


def _text(message: ChatMessage, i: int) -> str:
    content = message.content
    if isinstance(content, list):
        if any(part.type != "text" or part.text is None for part in content):
            raise APIError(400, f"messages.{i}.content: only text parts are supported", param=f"messages.{i}.content")
        return "\n".join(part.text for part in content)  # type: ignore[misc]
    return content or ""


def _arguments(text: str, i: int) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise APIError(400, f"messages.{i}.tool_calls: arguments must be a JSON object ({exc})",
                       param=f"messages.{i}.tool_calls") from exc


def template_messages(body: ChatCompletionRequest, native_tools: bool) -> list[dict[str, Any]]:
    """The messages as template dicts. With native_tools the template renders tool_calls and tool turns
    itself (arguments as objects, as transformers' templates expect); without, they become text."""
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        content = _text(m, i)
        if m.role == "assistant" and m.tool_calls:
            calls = [{"id": c.id, "type": "function",
                      "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments, i)}}
                     for c in m.tool_calls]
            if native_tools:
                messages.append({"role": "assistant", "content": content, "tool_calls": calls})
                continue
            content += "".join(f"\n<tool_call>\n{json.dumps(c['function'])}\n</tool_call>" for c in calls)
        elif m.role == "tool" and not native_tools:
            messages.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
            continue
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.role == "tool" and m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    return messages


def with_tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools as a system prompt, after the request's own system prompt if it has one."""
    prompt = TOOL_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def load_chat_template(value: str) -> str:
    """--chat-template: a file's contents, or the template itself (vLLM's rule: a path if one exists, else
    text that must look like a template). ValueError for neither, or for Jinja that does not parse."""
    from pathlib import Path

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif "{" in value:
        text = value
    else:
        raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template: not a valid Jinja template: {exc}") from exc
    return text


def load_default_kwargs(value: str | None) -> dict[str, Any]:
    """--default-chat-template-kwargs: a JSON object (the server's operator sets it: no allow-list)."""
    if not value:
        return {}
    try:
        kwargs = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"--default-chat-template-kwargs: not JSON ({exc})") from exc
    if not isinstance(kwargs, dict):
        raise ValueError("--default-chat-template-kwargs: must be a JSON object, e.g. '{\"thinking\": true}'")  # noqa: TRY004 - a usage error
    return kwargs
