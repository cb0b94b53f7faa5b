"""Fill what a request leaves unset from the model's generation defaults (engine/generation_defaults.py).

"Unset" is pydantic's model_fields_set: a field the client did not send, so an explicit `"temperature": 1.0`
stays 1.0 even where the model's default is 0.6. max_tokens follows vLLM's get_max_tokens: the model's
max_new_tokens caps whatever the request asks (or its own default), never raises it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from r1deploy.server.protocol import ChatCompletionRequest, SamplingRequest

Body = TypeVar("Body", bound=SamplingRequest)


def with_generation_defaults(body: Body, defaults: Mapping[str, Any]) -> Body:
    update = {name: value for name, value in defaults.items()
              if name != "max_tokens" and name not in body.model_fields_set}
    cap = defaults.get("max_tokens")
    if cap is not None:
        # chat reads max_completion_tokens or max_tokens; capping both keeps either choice within the cap
        limits = ("max_tokens", "max_completion_tokens") if isinstance(body, ChatCompletionRequest) else ("max_tokens",)
        update |= {name: cap for name in limits if getattr(body, name) is None or getattr(body, name) > cap}
    return body.model_copy(update=update) if update else body
