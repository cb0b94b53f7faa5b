"""Structured output: grammars (JSON schema, regex, choice, EBNF) compiled by xgrammar into per-request
matchers whose token bitmasks the sampler applies to the whole batch."""

from r1deploy.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
