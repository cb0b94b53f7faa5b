"""Our R1 chat template (presets/r1_chat_template.jinja), the fallback for R1-family checkpoints that ship
none: exact text and ids on a tiny tokenizer with R1's special tokens, when it applies, and end to end
through the server with a forced `reasoning</think>answer` output split into reasoning_content / content."""

from __future__ import annotations

from pathlib import Path

import httpx
import jinja2
import pytest
import torch
from server_harness import running_app, tiny_engine, wait_for_phase
from sse_util import events
from tiny import _save_tiny_model
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from r1deploy.core.forward_batch import ForwardBatch
from r1deploy.engine.engine import LLMEngine
from r1deploy.presets import is_r1_family, r1_chat_template, r1_template_text
from r1deploy.server.state import Phase

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIALS = ["<unk>", BOS, EOS]  # ids 0, 1, 2: the tiny model's config has bos 1 and eos 2
ADDED = [USER, ASSISTANT, "<think>", "</think>", "\n\n", "\n"]  # R1 keeps these non-special
# Output words without the Metaspace mark, so "reasoning</think>answer" decodes with no spaces.
WORDS = ["reasoning", "answer", *(f"\u2581{w}" for w in ["be", "brief", "hi", "hmm", "one", "plus", "two", "why"])]
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "<think>\nhmm one plus one</think>\n\ntwo"},
    {"role": "user", "content": "why"},
]
EXPECTED = (f"{BOS}be brief{USER}hi{ASSISTANT}\n\ntwo{EOS}{USER}why{ASSISTANT}<think>\n")
EXPECTED_TOKENS = [BOS, "\u2581be", "\u2581brief", USER, "\u2581hi", ASSISTANT, "\n\n", "\u2581two", EOS,
                   USER, "\u2581why", ASSISTANT, "<think>", "\n"]


def r1_tokenizer(role_tokens: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with R1's special tokens and no chat template (like a converted checkpoint)."""
    added = ADDED if role_tokens else ADDED[2:]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*SPECIALS, *added, *WORDS])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token="<unk>")


def test_renders_r1_format_exactly() -> None:
    tokenizer = r1_tokenizer()
    template = r1_chat_template("LlamaForCausalLM", "converted", tokenizer)
    assert template is not None
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    assert text == EXPECTED  # system first, old reasoning gone, the thought opened at the end
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.convert_tokens_to_ids(EXPECTED_TOKENS)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_system_prompts_join_and_unknown_roles_fail() -> None:
    tokenizer = r1_tokenizer()
    template = r1_chat_template("DeepseekV3ForCausalLM", "x", tokenizer)
    messages = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "system", "content": "c"}]
    assert tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False) == f"{BOS}a\n\nc{USER}b"
    with pytest.raises(jinja2.TemplateError, match="function"):  # the server turns this into a 400
        tokenizer.apply_chat_template([{"role": "function", "content": "x"}], chat_template=template,
                                      tokenize=False)


def test_renders_deepseek_tool_format() -> None:
    """Tools in the system prompt, past calls in DeepSeek-V3's tool-call tokens, results as tool outputs,
    and the assistant continuing after them without a new role tag."""
    tokenizer = r1_tokenizer()
    template = r1_chat_template("DeepseekV3ForCausalLM", "x", tokenizer)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]
    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": "rain", "tool_call_id": "call_1"},
                {"role": "tool", "content": "sun", "tool_call_id": "call_2"}]
    text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    function = '{\n    "name": "get_weather",\n    "parameters": {\n        "type": "object"\n    }\n}'
    assert text == (
        f"{BOS}## Tools\n\n### Function\n\nYou have the following functions available:\n\n- `get_weather`:\n"
        f"```json\n{function}\n```\n\nTo call functions, answer with <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
        "function<｜tool▁sep｜>NAME\n```json\nARGUMENTS\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>, one "
        "<｜tool▁call▁begin｜>...<｜tool▁call▁end｜> per call."
        f"{USER}weather?{ASSISTANT}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Oslo"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n'
        f'```json\n{{"city": "Rome"}}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>{EOS}'
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>rain<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>sun"
        "<｜tool▁output▁end｜><｜tool▁outputs▁end｜><think>\n")


def test_fallback_only_for_r1_family_without_a_template() -> None:
    plain = r1_tokenizer(role_tokens=False)
    assert is_r1_family("DeepseekV3ForCausalLM", "anything")  # V3 and R1 share the architecture
    assert is_r1_family("Qwen2ForCausalLM", "DeepSeek-R1-Distill-Qwen-7B")  # the hub name of an HF directory
    assert is_r1_family("LlamaForCausalLM", "converted", r1_tokenizer())  # R1's role tokens in the vocabulary
    assert not is_r1_family("LlamaForCausalLM", "converted", plain)
    assert not is_r1_family("DeepseekV2ForCausalLM", "deepseek-v2-lite", plain)
    assert r1_chat_template("LlamaForCausalLM", "converted", plain) is None
    assert r1_chat_template("DeepseekV3ForCausalLM", "r1", None) is None  # dummy weights: no tokenizer
    own = r1_tokenizer()
    own.chat_template = "{{ messages[0]['content'] }}"
    assert r1_chat_template("DeepseekV3ForCausalLM", "deepseek-r1", own) is None  # the checkpoint's own wins


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with R1's tokenizer and no chat template, under a name that says nothing: only the
    vocabulary marks it as R1-family."""
    path = tmp_path_factory.mktemp("converted")
    _save_tiny_model(path)
    r1_tokenizer().save_pretrained(path)
    return path


def forced_engine(path: Path) -> LLMEngine:
    """The tiny engine with its model replaced by a script on the last input token:
    `\\n` (the end of the generation prompt) -> reasoning -> </think> -> answer -> end of sentence."""
    engine = tiny_engine(path)
    tokenizer = engine.tokenizer
    assert tokenizer is not None
    ids = dict(zip(["\n", "reasoning", "</think>", "answer"],
                   tokenizer.convert_tokens_to_ids(["\n", "reasoning", "</think>", "answer"]), strict=True))
    script = {ids["\n"]: ids["reasoning"], ids["reasoning"]: ids["</think>"], ids["</think>"]: ids["answer"]}
    vocab, eos = engine.model_config.vocab_size, tokenizer.eos_token_id
    model = engine.runner.model

    def forward(batch: ForwardBatch, kv_caches: object) -> torch.Tensor:
        return batch.input_ids.to(torch.float32)[:, None]  # each row carries its token to compute_logits

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.full((hidden.shape[0], vocab), -1e4)
        for row, token in enumerate(hidden[:, 0].long().tolist()):
            logits[row, script.get(token, eos)] = 0.0
        return logits

    model.forward, model.compute_logits = forward, compute_logits
    return engine


@pytest.mark.anyio
async def test_server_uses_r1_template_and_splits_reasoning(r1_dir: Path) -> None:
    async with running_app(r1_dir, load=lambda: forced_engine(r1_dir)) as running:
        await wait_for_phase(running.state, Phase.READY)
        engine = running.state.llm_engine
        # The saved tokenizer has no template: the loader put ours in (so generate and bench see it too).
        assert AutoTokenizer.from_pretrained(r1_dir).chat_template is None
        assert engine is not None and engine.tokenizer.chat_template == r1_template_text()
        assert running.state.reasoning
        prompt = engine.chat_prompt_ids(CONVERSATION)
        assert prompt == engine.tokenizer.convert_tokens_to_ids(EXPECTED_TOKENS)

        client: httpx.AsyncClient = running.client
        body = {"messages": CONVERSATION, "max_tokens": 16, "temperature": 0}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["reasoning_content"] == "reasoning"
        assert choice["message"]["content"] == "answer"
        assert choice["finish_reason"] == "stop"
        assert r.json()["usage"]["prompt_tokens"] == len(prompt)

        r = await client.post("/v1/chat/completions", json={**body, "stream": True})
        deltas = [c["choices"][0]["delta"] for c in events(r.text) if c["choices"]]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == "reasoning"
        assert "".join(d.get("content") or "" for d in deltas) == "answer"
