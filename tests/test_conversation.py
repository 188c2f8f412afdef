"""The conversation core every front end runs on: history -> engine messages, streaming, tools,
stop, regenerate, save/open with media, and the page's rendering of it."""
from __future__ import annotations

import wave

import numpy as np
import pytest
from PIL import Image

from app import conversation_store, media as media_files
from app.agents import TextDelta
from app.conversation import Attachment, Busy, Conversation, Settings, Unsupported, format_usage
from app.engine_api import Usage
from app.ui.handlers import SPOKEN_QUESTION
from app.ui.render import chat_messages
from tests.fakes import ScriptedEngine

CALL = '[{"name": "calculate", "arguments": {"expression": "6*7"}}]<|/tool_call|>'


def run(events):
    """Read an answer to its end; return its FinalAnswer."""
    final = None
    for event in events:
        final = event
    return final


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
    engine = ScriptedEngine("Paris.", "Rome.")
    conv = Conversation(engine, settings=Settings(system="Be brief."))
    pieces = [e.text for e in conv.ask("Capital of France?") if isinstance(e, TextDelta)]
    assert conv.turns[0].answer == "Paris." and len(pieces) > 1  # it streamed
    run(conv.ask("And Italy?"))
    assert engine.requests[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"}]
    assert conv.messages == engine.requests[1]["messages"] + [{"role": "assistant", "content": "Rome."}]
    assert conv.turns[1].answer == "Rome." and conv.turns[1].usage.decode_tokens_per_s == 20.0


def test_sampling_settings_reach_the_engine():
    engine = ScriptedEngine("ok")
    run(Conversation(engine).ask("hi", settings=Settings(temperature=0.7, top_p=0.9, top_k=40, max_tokens=99,
                                                          seed=5)))
    request = engine.requests[0]
    assert (request["temperature"], request["top_p"], request["top_k"], request["max_tokens"], request["seed"]) == \
        (0.7, 0.9, 40, 99, 5)


def test_a_tool_call_is_a_step_and_stays_in_the_history():
    engine = ScriptedEngine("Let me compute. <|tool_call|>", CALL, "It is 42.", "Yes.")
    conv = Conversation(engine, tools={"calculate": __import__("tools").calculate},
                        settings=Settings(tools=["calculate"]))
    seen_pending = False
    for _ in conv.ask("What is 6*7?"):
        seen_pending |= any(not s.done for s in conv.turns[-1].steps)
    turn = conv.turns[-1]
    assert turn.answer == "It is 42." and seen_pending
    [step] = turn.steps
    assert (step.name, step.arguments, step.result, step.error, step.done) == \
        ("calculate", {"expression": "6*7"}, "42", None, True)
    assert engine.requests[1]["grammar"]  # the call was generated under the tools' grammar
    run(conv.ask("Sure?"))
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
    engine = ScriptedEngine("<|tool_call|>", call, "Done.")
    conv = Conversation(engine, tools={"dump": dump}, settings=Settings(tools=["dump"]))
    run(conv.ask("Dump it."))
    turn = conv.turns[-1]
    assert turn.error is None, turn.error
    [step] = turn.steps
    [seen] = [m["content"] for m in engine.requests[-1]["messages"] if m["role"] == "tool"]
    assert step.result == seen and len(seen) < 9000 and seen.endswith("[... cut: 12000 more characters]")


def test_images_and_audio_become_content_parts(media):
    image, audio = media
    engine = ScriptedEngine("A red square.")
    conv = Conversation(engine)
    run(conv.ask("What is this?", [Attachment("image", str(image), max_crops=2), Attachment("audio", str(audio))]))
    parts = engine.requests[0]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image", "audio", "text"]
    # The engine gets the files; what it reads from them is the picture and the samples written.
    assert parts[0]["image"] == str(image) and parts[0]["max_crops"] == 2 and parts[1]["audio"] == str(audio)
    assert media_files.load_image_file(parts[0]["image"]).size == (64, 48)
    samples, rate = media_files.load_audio_file(parts[1]["audio"])
    written = (np.sin(np.arange(8000) / 5) * 8000).astype(np.int16)  # what the `media` fixture wrote
    assert rate == 8000 and samples.dtype == np.float32 and np.array_equal(samples, written / np.float32(32768))
    assert conv.turns[0].usage.adapter == "vision"
    assert "vision LoRA" in chat_messages(conv)[-1]["content"]
    user = chat_messages(conv)[0]["content"]
    assert user[0] == "What is this?" and user[1] == {"path": str(image)} and user[2] == {"path": str(audio)}


def test_a_model_without_encoders_refuses_media_with_the_reason(media):
    engine = ScriptedEngine(modalities=())
    conv = Conversation(engine, unsupported_reason="the text-only fallback is running")
    with pytest.raises(Unsupported, match="cannot read images .the text-only fallback"):
        conv.add("What is this?", [Attachment("image", str(media[0]))])
    with pytest.raises(Unsupported, match="cannot read audio"):
        conv.add(SPOKEN_QUESTION, [Attachment("audio", str(media[1]))])


def test_stop_ends_the_stream_and_keeps_the_partial_answer():
    engine = ScriptedEngine("one two three four five six seven eight nine ten")
    conv = Conversation(engine)
    for i, _ in enumerate(conv.ask("Count.")):
        if i == 3:
            conv.stop()  # what the Stop button does, from another thread
    turn = conv.turns[-1]
    assert turn.stopped and not turn.pending and 0 < len(turn.answer) < 20
    assert engine.closed_early == 1  # the engine's stream was closed, so its lock is free
    assert "*(stopped)*" in chat_messages(conv)[-1]["content"]
    assert conv.messages[-1] == {"role": "assistant", "content": turn.answer}  # the model sees what it said


def test_one_question_at_a_time_and_regenerate_replaces_the_answer():
    engine = ScriptedEngine("first", "second")
    conv = Conversation(engine)
    conv.add("Hello")
    with pytest.raises(Busy):
        conv.add("Hello again")
    run(conv.answer())
    assert conv.turns[-1].answer == "first"
    conv.retry()
    run(conv.answer())
    assert len(conv.turns) == 1 and conv.turns[0].answer == "second"
    assert engine.requests[1]["messages"] == engine.requests[0]["messages"]
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]


def test_answer_without_a_new_question_does_nothing():
    engine = ScriptedEngine("first")
    conv = Conversation(engine)
    run(conv.ask("Hello"))
    assert run(conv.answer()) is None and len(engine.requests) == 1


def test_stop_while_queued_answers_nothing():
    engine = ScriptedEngine("never")
    conv = Conversation(engine)
    conv.add("Hello")
    conv.stop()
    final = run(conv.answer())
    turn = conv.turns[-1]
    assert turn.stopped and not turn.pending and engine.requests == [] and final.result.stop_reason == "stopped"


def test_an_engine_error_is_shown_in_the_turn_not_raised():
    conv = Conversation(ScriptedEngine(RuntimeError("the conversation needs 9000 tokens but the context holds 8192")))
    final = run(conv.ask("Hello"))
    turn = conv.turns[-1]
    assert "9000 tokens" in turn.error and not turn.pending and final.error == turn.error
    assert "9000 tokens" in chat_messages(conv)[-1]["content"]
    assert [m["role"] for m in conv.messages] == ["system"]  # the model never sees the failed question


def test_save_and_open_with_media(tmp_path, media):
    image, audio = media
    engine = ScriptedEngine("A red square.", "Yes.")
    conv = Conversation(engine, settings=Settings(system="Be brief."))
    run(conv.ask("What is this?", [Attachment("image", str(image), 3), Attachment("audio", str(audio))]))
    folder = conversation_store.save(conv, tmp_path / "saved" / "first")
    image.unlink(), audio.unlink()  # the saved copies must be enough
    media_files.clear_caches()
    opened = conversation_store.load(folder, engine)
    assert opened.settings.system == "Be brief." and opened.title == "What is this?"
    assert [a.kind for a in opened.turns[0].attachments] == ["image", "audio"]
    assert opened.turns[0].attachments[0].max_crops == 3 and opened.turns[0].answer == "A red square."
    assert opened.turns[0].usage == conv.turns[0].usage
    run(opened.ask("Sure?"))
    sent = engine.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]  # the history as it was
    parts = sent[1]["content"]
    assert media_files.load_image_file(parts[0]["image"]).getpixel((0, 0)) == (200, 30, 30)
    assert [label for label, _ in conversation_store.saved_conversations(tmp_path / "saved")][0].endswith(
        "What is this?")
    conversation_store.save(opened, folder)  # saving again into the same folder keeps the media
    assert len(list((folder / "media").iterdir())) == 2


def test_a_conversation_of_the_first_format_still_opens(tmp_path, media):
    image, _ = media
    folder = tmp_path / "old"
    (folder / "media").mkdir(parents=True)
    (folder / "media" / "000-0-cat.png").write_bytes(image.read_bytes())
    document = {"version": 1, "title": "What is this?", "saved": "2026-11-01 10:00:00", "system": "Be brief.",
                "turns": [{"text": "What is this?", "answer": "A red square.", "stopped": False, "error": None,
                           "attachments": [{"kind": "image", "file": "media/000-0-cat.png", "max_crops": 2}],
                           "steps": [], "stats": {"adapter": "vision", "reused_tokens": 3, "decode_tokens": 7},
                           "tool_messages": []}]}
    import json

    (folder / "conversation.json").write_text(json.dumps(document))
    engine = ScriptedEngine("Yes.")
    opened = conversation_store.load(folder, engine)
    assert opened.turns[0].usage.cached_tokens == 3 and opened.turns[0].usage.completion_tokens == 7
    run(opened.ask("Sure?"))
    sent = engine.requests[0]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"][0] == {"type": "image", "image": str(folder / "media/000-0-cat.png"), "max_crops": 2}


def test_format_usage():
    usage = Usage(adapter="speech", prompt_tokens=1065, cached_tokens=12, encoder_ms=850.4, prefill_ms=1000.0,
                  ttft_ms=3210.0, completion_tokens=51, decode_ms=5000.0)
    assert format_usage(usage) == ("speech LoRA · 1,065 prompt tokens (12 cached) · encoder 850 ms · "
                                   "prefill 1,053.0 tok/s · decode 10.2 tok/s · TTFT 3.21 s")
    usage.adapter, usage.encoder_ms = None, 0
    assert format_usage(usage).startswith("no LoRA (text) · 1,065")


@pytest.mark.slow
def test_a_real_model_keeps_the_conversation_and_its_cache():
    from app.engine import LocalEngine
    from tests.test_smollm2 import N_CTX, PlainLlama, smollm2_path

    engine = LocalEngine.load(smollm2_path(), n_ctx=N_CTX)
    plain = PlainLlama(smollm2_path(), N_CTX, engine.n_threads)
    try:
        conv = Conversation(engine, settings=Settings(system="You are a helpful assistant.", max_tokens=40))
        run(conv.ask("What is the capital of Germany?"))
        first = conv.turns[-1]
        run(conv.ask("And of Italy?"))
        second = conv.turns[-1]
        assert second.usage.cached_tokens >= first.usage.prompt_tokens
        # The model read the whole conversation: the answer is what a cold run of it gives
        # (its exact words depend on the CPU, the same model on the same machine agrees).
        assert second.answer == plain.text(plain.greedy(conv.messages[:-1], 40)).strip() != ""
    finally:
        plain.close()
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


def test_a_lone_surrogate_does_not_make_a_conversation_unsaveable(tmp_path):
    engine = ScriptedEngine("Noted.")
    conv = Conversation(engine)
    run(conv.ask("broken text: \ud800 here"))
    folder = conversation_store.save(conv, tmp_path / "c")
    opened = conversation_store.load(folder, engine)
    assert opened.turns[0].text == "broken text: \ud800 here" and opened.messages == conv.messages


def test_a_damaged_saved_conversation_is_listed_and_reported_and_the_others_still_open(tmp_path):
    engine = ScriptedEngine("Fine.")
    conv = Conversation(engine)
    run(conv.ask("A good one"))
    good = conversation_store.save(conv, tmp_path / "good")
    for name, text in (("truncated", '{"version": 2, "turns": [{"te'), ("wrong-shape", '{"version": 2, "turns": 3}'),
                       ("not-json", "\x00\x01")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "conversation.json").write_text(text)
    listed = dict((folder, label) for label, folder in conversation_store.saved_conversations(tmp_path))
    assert listed[str(good)].endswith("A good one") and len(listed) == 4
    for name in ("truncated", "wrong-shape", "not-json"):
        with pytest.raises(ValueError, match=f"{name}: .*conversation.json"):
            conversation_store.load(tmp_path / name, engine)
    assert conversation_store.load(good, engine).turns[0].answer == "Fine."


def test_the_private_copies_of_attachments_go_with_the_last_conversation_that_uses_them(tmp_path):
    import copy
    import gc
    from pathlib import Path

    source = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(source)
    conversation = Conversation(ScriptedEngine(["ok"]))
    kept = Path(conversation.keep(source))
    assert kept.read_bytes() == source.read_bytes() and kept.parent != tmp_path
    twin = copy.deepcopy(conversation)  # the page's per-session copy shares the files
    assert Path(twin.keep(source)).parent == kept.parent
    del conversation
    gc.collect()
    assert kept.exists()
    del twin
    gc.collect()
    assert not kept.parent.exists()


def test_a_save_that_dies_halfway_leaves_the_last_saved_version_whole(tmp_path, monkeypatch):
    """A webcam frame and a clip held in memory are written once, whole, under their content's
    name: saving again neither rewrites them nor, killed halfway, truncates them (a kill -9 during
    the page's autosave used to leave the last saved version with a truncated picture)."""
    from pathlib import Path

    from app.engine_api import AUDIO, IMAGE

    conversation = Conversation(ScriptedEngine(["one", "two"]))
    clip = (np.sin(np.arange(8000) / 9).astype(np.float32) * 0.1, 16_000)
    list(conversation.ask("first", [Attachment(IMAGE, data=Image.new("RGB", (64, 48), (10, 200, 30))),
                                    Attachment(AUDIO, data=clip)]))
    folder = tmp_path / "saved"
    conversation_store.save(conversation, folder)
    written = {p.name: p.stat().st_mtime_ns for p in (folder / "media").iterdir()}
    list(conversation.ask("second", [Attachment(IMAGE, data=Image.new("RGB", (64, 48), (200, 0, 0)))]))

    def killed_while_writing(self, fp, format=None, **params):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half a picture")
        raise KeyboardInterrupt  # stands for the kill: nothing after this line runs

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", killed_while_writing)
        with pytest.raises(KeyboardInterrupt):
            conversation_store.save(conversation, folder)
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "media").iterdir()} == written  # no leftovers either
    opened = conversation_store.load(folder, ScriptedEngine())
    image, audio = opened.turns[0].attachments
    assert len(opened.turns) == 1 and media_files.load_image_file(image.path).getpixel((0, 0)) == (10, 200, 30)
    assert media_files.load_audio_file(audio.path)[0] == pytest.approx(clip[0], abs=1e-4)

    conversation_store.save(conversation, folder)  # and the next save completes it
    assert len(conversation_store.load(folder, ScriptedEngine()).turns) == 2
    assert all(p.stat().st_mtime_ns == t for p in (folder / "media").iterdir() if (t := written.get(p.name)))
