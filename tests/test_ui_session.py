"""The page's Gradio-free core: conversation -> engine messages, streaming, tools, stop,
regenerate, save/open with media, and the chat rendering."""
from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.chat_session import (
    SPOKEN_QUESTION,
    Assistant,
    Attachment,
    Busy,
    Conversation,
    Settings,
    Unsupported,
    format_stats,
    read_audio,
    saved_conversations,
)
from app.engine import Timings
from app.ui.render import chat_messages

CALL = '[{"name": "calculate", "arguments": {"expression": "6*7"}}]<|/tool_call|>'


class ScriptedEngine:
    """Answers with scripted replies, streamed in small pieces; records what it was asked."""

    def __init__(self, replies, modalities=("image", "audio")):
        self.replies = list(replies)
        self.modalities = set(modalities)
        self.requests: list[dict] = []
        self.closed_early = 0
        self.last = Timings()

    def generate(self, messages, stream=False, **options):
        self.requests.append({"messages": [dict(m) for m in messages], **options})  # the agent appends later
        text = self.replies.pop(0)
        kinds = {p["type"] for m in messages if isinstance(m["content"], list) for p in m["content"]}
        self.last = Timings(adapter="vision" if "image" in kinds else "speech" if "audio" in kinds else None,
                            prompt_tokens=100, reused_tokens=40, encoder_ms=12.0, prefill_ms=600.0, ttft_ms=650.0,
                            decode_tokens=10, decode_ms=500.0, finish_reason="stop")
        if not stream:
            return text
        return self._pieces(text)

    def _pieces(self, text):
        try:
            for i in range(0, len(text), 3):
                yield text[i:i + 3]
        except GeneratorExit:
            self.closed_early += 1
            raise


def run(iterator):
    turn = None
    for turn in iterator:
        pass
    return turn


@pytest.fixture
def media(tmp_path):
    image = tmp_path / "cat.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    audio = tmp_path / "question.wav"
    write_wav(audio, (np.sin(np.arange(8000) / 5) * 8000).astype(np.int16), 8000)
    return image, audio


def write_wav(path, samples, rate, width=2):
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def test_turns_become_the_engine_messages_of_the_next_turn():
    engine = ScriptedEngine(["Paris.", "Rome."])
    assistant, conv = Assistant(engine), Conversation()
    pieces = [t.answer for t in assistant.ask(conv, "Capital of France?", settings=Settings(system="Be brief."))]
    assert pieces[-1] == "Paris." and len(set(pieces)) > 2  # it streamed
    run(assistant.ask(conv, "And Italy?", settings=Settings(system="Be brief.")))
    assert engine.requests[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"}]
    assert conv.turns[1].answer == "Rome." and conv.turns[1].stats["decode_tokens_per_s"] == 20.0


def test_sampling_settings_reach_the_engine():
    engine = ScriptedEngine(["ok"])
    run(Assistant(engine).ask(Conversation(), "hi", settings=Settings(temperature=0.7, top_p=0.9, top_k=40,
                                                                        max_tokens=99, seed=5)))
    request = engine.requests[0]
    assert (request["temperature"], request["top_p"], request["top_k"], request["max_tokens"], request["seed"]) == \
        (0.7, 0.9, 40, 99, 5)


def test_a_tool_call_is_a_step_and_stays_in_the_history():
    engine = ScriptedEngine(["Let me compute. <|tool_call|>", CALL, "It is 42.", "Yes."])
    assistant = Assistant(engine, tools={"calculate": __import__("tools").calculate})
    conv = Conversation()
    seen_pending = False
    for turn in assistant.ask(conv, "What is 6*7?", settings=Settings(tools=["calculate"])):
        seen_pending |= any(not s.done for s in turn.steps)
    assert turn.answer == "It is 42."
    [step] = turn.steps
    assert (step.name, step.arguments, step.result, step.error, step.done) == \
        ("calculate", {"expression": "6*7"}, "42", None, True)
    assert engine.requests[1]["grammar"]  # the call was generated under the tools' grammar
    run(assistant.ask(conv, "Sure?", settings=Settings(tools=["calculate"])))
    history = engine.requests[-1]["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert history[3]["content"] == "42" and history[4]["content"] == "It is 42."
    messages = chat_messages(conv)
    step_message = messages[1]
    assert step_message["metadata"]["title"] == "Tool call: calculate"
    assert step_message["metadata"]["status"] == "done" and "6*7" in step_message["content"]
    assert "42" in step_message["content"]


def test_a_huge_tool_result_is_shown_as_the_model_read_it():
    def dump() -> str:
        """Dump everything."""
        return "x" * 20_000

    call = '[{"name": "dump", "arguments": {}}]<|/tool_call|>'
    engine = ScriptedEngine(["<|tool_call|>", call, "Done."])
    turn = run(Assistant(engine, tools={"dump": dump}).ask(
        Conversation(), "Dump it.", settings=Settings(tools=["dump"])))
    assert turn.error is None, turn.error
    [step] = turn.steps
    [seen] = [m["content"] for m in engine.requests[-1]["messages"] if m["role"] == "tool"]
    assert step.result == seen and len(seen) < 9000 and seen.endswith("[... cut: 12000 more characters]")


def test_images_and_audio_become_content_parts(media):
    image, audio = media
    engine = ScriptedEngine(["A red square."])
    conv = Conversation()
    turn = run(Assistant(engine).ask(conv, "What is this?", [Attachment("image", str(image), max_crops=2),
                                                             Attachment("audio", str(audio))]))
    parts = engine.requests[0]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image", "audio", "text"]
    assert parts[0]["image"].size == (64, 48) and parts[0]["max_crops"] == 2
    samples, rate = parts[1]["audio"]
    written = (np.sin(np.arange(8000) / 5) * 8000).astype(np.int16)  # what the `media` fixture wrote
    assert rate == 8000 and samples.dtype == np.float32 and np.array_equal(samples, written / np.float32(32768))
    assert turn.stats["adapter"] == "vision"
    assert "vision LoRA" in chat_messages(conv)[-1]["content"]
    user = chat_messages(conv)[0]["content"]
    assert user[0] == "What is this?" and user[1] == {"path": str(image)} and user[2] == {"path": str(audio)}


def test_a_model_without_encoders_refuses_media_with_the_reason(media):
    assistant = Assistant(ScriptedEngine([], modalities=()), unsupported_reason="the text-only fallback is running")
    with pytest.raises(Unsupported, match="cannot read images .the text-only fallback"):
        assistant.add(Conversation(), "What is this?", [Attachment("image", str(media[0]))])
    with pytest.raises(Unsupported, match="cannot read audio"):
        assistant.add(Conversation(), SPOKEN_QUESTION, [Attachment("audio", str(media[1]))])


def test_stop_ends_the_stream_and_keeps_the_partial_answer():
    engine = ScriptedEngine(["one two three four five six seven eight nine ten"])
    conv = Conversation()
    stream = Assistant(engine).ask(conv, "Count.")
    for i, turn in enumerate(stream):
        if i == 3:
            conv.stop_requested = True  # what the Stop button does, from another thread
    assert turn.stopped and not turn.pending and 0 < len(turn.answer) < 20
    assert engine.closed_early == 1  # the engine's generator was closed, so its lock is free
    assert "*(stopped)*" in chat_messages(conv)[-1]["content"]


def test_one_question_at_a_time_and_regenerate_replaces_the_answer():
    engine = ScriptedEngine(["first", "second"])
    assistant, conv = Assistant(engine), Conversation()
    assistant.add(conv, "Hello")
    with pytest.raises(Busy):
        assistant.add(conv, "Hello again")
    run(assistant.answer(conv))
    assert conv.turns[-1].answer == "first"
    assistant.retry(conv)
    run(assistant.answer(conv))
    assert len(conv.turns) == 1 and conv.turns[0].answer == "second"
    assert engine.requests[1]["messages"] == engine.requests[0]["messages"]


def test_answer_without_a_new_question_does_nothing():
    engine = ScriptedEngine(["first"])
    assistant, conv = Assistant(engine), Conversation()
    run(assistant.ask(conv, "Hello"))
    assert run(assistant.answer(conv)) is None and len(engine.requests) == 1


def test_stop_while_queued_answers_nothing():
    engine = ScriptedEngine(["never"])
    assistant, conv = Assistant(engine), Conversation()
    assistant.add(conv, "Hello")
    conv.stop_requested = True
    turn = run(assistant.answer(conv))
    assert turn.stopped and not turn.pending and engine.requests == []


def test_an_engine_error_is_shown_in_the_turn_not_raised():
    class Failing(ScriptedEngine):
        def generate(self, messages, **options):
            raise RuntimeError("the conversation needs 9000 tokens but the context holds 8192")

    conv = Conversation()
    turn = run(Assistant(Failing([])).ask(conv, "Hello"))
    assert "9000 tokens" in turn.error and not turn.pending
    assert "9000 tokens" in chat_messages(conv)[-1]["content"]


def test_save_and_open_with_media(tmp_path, media):
    image, audio = media
    engine = ScriptedEngine(["A red square.", "Yes."])
    assistant, conv = Assistant(engine), Conversation(system="Be brief.")
    run(assistant.ask(conv, "What is this?", [Attachment("image", str(image), 3), Attachment("audio", str(audio))],
                      Settings(system="Be brief.")))
    folder = conv.save(tmp_path / "saved" / "first")
    image.unlink(), audio.unlink()  # the saved copies must be enough
    opened = Conversation.load(folder)
    assert opened.system == "Be brief." and opened.title == "What is this?"
    assert [a.kind for a in opened.turns[0].attachments] == ["image", "audio"]
    assert opened.turns[0].attachments[0].max_crops == 3 and opened.turns[0].answer == "A red square."
    assert opened.turns[0].stats == conv.turns[0].stats
    run(assistant.ask(opened, "Sure?", settings=Settings(system="Be brief.")))
    parts = engine.requests[-1]["messages"][1]["content"]
    assert parts[0]["image"].getpixel((0, 0)) == (200, 30, 30)
    assert [label for label, _ in saved_conversations(tmp_path / "saved")][0].endswith("What is this?")
    opened.save(folder)  # saving again into the same folder keeps the media
    assert len(list((folder / "media").iterdir())) == 2


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_audio_wav_widths_and_channels(tmp_path, width):
    rng = np.random.default_rng(0)
    dtype = {1: np.uint8, 2: np.int16, 3: np.uint8, 4: np.int32}[width]
    if width == 3:
        raw = rng.integers(0, 256, size=(100 * 2 * 3,), dtype=np.uint8)
    else:
        raw = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=(100, 2), dtype=dtype)
    path = tmp_path / "a.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(width), w.setframerate(22050)
        w.writeframes(raw.tobytes())
    samples, rate = read_audio(str(path))
    assert rate == 22050 and samples.shape == (100, 2)


def test_read_audio_float_wav_without_ffmpeg(tmp_path):
    """A 32-bit float WAV (what browsers and many editors write) is read natively, not through pydub."""
    samples = np.stack([np.linspace(-1, 1, 160), np.zeros(160)], axis=1).astype("<f4")
    fmt = struct.pack("<HHIIHH", 3, 2, 48000, 48000 * 8, 8, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", samples.nbytes)
    path = tmp_path / "float.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body) + samples.nbytes) + body + samples.tobytes())
    read, rate = read_audio(str(path))
    assert rate == 48000 and read.dtype == np.float32 and np.array_equal(read, samples)
    assert not read.flags.writeable  # the cached copy cannot be changed by one of its users


def test_format_stats():
    stats = {"adapter": "speech", "prompt_tokens": 1065, "reused_tokens": 12, "encoder_ms": 850.4,
             "prefill_tokens_per_s": 45.12, "decode_tokens_per_s": 10.2, "ttft_ms": 3210.0}
    assert format_stats(stats) == ("speech LoRA · 1,065 prompt tokens (12 cached) · encoder 850 ms · "
                                   "prefill 45.1 tok/s · decode 10.2 tok/s · TTFT 3.21 s")
    assert format_stats({**stats, "adapter": None, "encoder_ms": 0}).startswith("no LoRA (text) · 1,065")


def test_a_real_model_keeps_the_conversation_and_its_cache():
    from app.engine import Engine
    from app.model_store import fallback_model_path

    engine = Engine.load(fallback_model_path(), n_ctx=2048)
    try:
        assistant, conv = Assistant(engine), Conversation()
        settings = Settings(system="You are a helpful assistant.", max_tokens=40)
        first = run(assistant.ask(conv, "What is the capital of Germany?", settings=settings))
        assert "berlin" in first.answer.lower()
        second = run(assistant.ask(conv, "And of Italy?", settings=settings))
        assert "rome" in second.answer.lower()
        assert second.stats["reused_tokens"] >= first.stats["prompt_tokens"]
    finally:
        engine.close()


def test_run_in_thread_keeps_the_source_in_one_thread_whoever_consumes_it():
    import threading

    from app.ui.one_thread import run_in_thread

    threads, closed = set(), []

    def source():
        try:
            for i in range(50):
                threads.add(threading.get_ident())
                yield i
        finally:
            closed.append(threading.get_ident())

    stream = run_in_thread(source)
    got = []

    def take(n):
        for _ in range(n):
            got.append(next(stream, None))

    for _ in range(3):  # consumed from three different threads, as Gradio does
        t = threading.Thread(target=take, args=(2,))
        t.start(), t.join()
    rest = [x for x in stream]
    assert len(threads) == 1 and closed == list(threads)
    values = [x for x in got + rest if x is not None]
    assert values == sorted(values) and values[-1] == 49  # newest last, the final item never dropped

    def failing():
        yield 1
        raise ValueError("broken file")

    with pytest.raises(ValueError, match="broken file"):
        list(run_in_thread(failing))
