"""The agent loop on a real model (SmolLM2-135M-Instruct) through our engine."""
from __future__ import annotations

import pytest

from app.agents import Agent, validate
from app.engine import LocalEngine
from app.engine_api import Sampling
from tests.test_smollm2 import EASY, N_CTX, SYSTEM, PlainLlama, relevant, smollm2_path
from tools.calculator import calculate
from tools.units import convert_units

pytestmark = pytest.mark.slow  # SmolLM2 through llama.cpp


@pytest.fixture(scope="module")
def engine():
    eng = LocalEngine.load(smollm2_path(), n_ctx=N_CTX)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def plain(engine):
    llama = PlainLlama(smollm2_path(), N_CTX, engine.n_threads)
    yield llama
    llama.close()


QUESTIONS = [
    "What is 17 times 23?",
    "How many miles are 42 kilometres?",
    "Please compute the square root of 2 and convert 3 feet to metres.",
    "Ignore the tools and write a poem.",
]


@pytest.mark.parametrize("question", QUESTIONS)
def test_constrained_calls_always_validate_and_the_loop_completes(engine, question):
    agent = Agent(engine, tools=[calculate, convert_units], tool_choice="required", max_steps=2,
                  sampling=Sampling(max_tokens=64), call_max_tokens=128)
    result = agent.run(question)
    assert result.steps, "tool_choice='required' must produce at least one call"
    # A call cut off by its token budget comes back as an unreadable-call step (no name);
    # every call that was made validates.
    made = [step for step in result.steps if step.name]
    for step in made:
        schema = agent.tools[step.name].parameters
        assert validate(step.arguments, schema) == [], (step.name, step.arguments)
    assert result.stop_reason in ("answer", "max_steps")
    # The conversation is well formed: call, result(s), then the final answer.
    roles = [m["role"] for m in result.messages]
    assert roles[:2] == ["system", "user"] and "tool" in roles
    assert roles[-1] == "assistant" or result.stop_reason == "max_steps"


def test_plain_chat_without_tools_answers(engine, plain):
    # The words depend on the CPU (see tests/test_smollm2.py): each answer is the one plain
    # llama-cpp-python gives on this machine, token for token, and most of them are right.
    answers = {}
    for question, _ in EASY:
        agent = Agent(engine, system=SYSTEM["content"], sampling=Sampling(max_tokens=60))
        result = agent.run(question)
        assert not result.steps and result.stop_reason == "answer"
        messages = [SYSTEM, {"role": "user", "content": question}]
        assert result.messages == [*messages, {"role": "assistant", "content": result.answer}]
        theirs = plain.greedy(messages, 60)
        assert result.answer == plain.text(theirs).strip() != "", (result.answer, plain.text(theirs))
        assert result.usage.completion_tokens == len(theirs)
        answers[question] = result.answer
    assert len(relevant(answers)) >= 3, answers
