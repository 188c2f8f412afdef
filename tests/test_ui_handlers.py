"""The page's handlers without a browser: what an attachment costs, and what the user is told."""
from __future__ import annotations

from PIL import Image

from app.ui.handlers import Handlers, PageInfo
from tests.fakes import ScriptedEngine


def handlers(tmp_path, modalities=("image", "audio")) -> Handlers:
    return Handlers(ScriptedEngine(modalities=modalities), {}, PageInfo("tiny", conversations_root=tmp_path))


def test_the_attachment_note_prices_each_file_and_says_an_animation_is_one_frame(tmp_path):
    still, animated = tmp_path / "still.png", tmp_path / "moving.gif"
    Image.new("RGB", (64, 48)).save(still)
    frames = [Image.new("RGB", (32, 32), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    note = handlers(tmp_path).attachments_note({"files": [str(still), str(animated)]}, 4, None, 1)
    assert "still.png 64×48 → 100 tokens" in note
    assert "moving.gif 32×32 → 100 tokens (animated GIF (3 frames): the model sees its first frame)" in note
    assert "200 tokens in all" in note


def test_files_that_cannot_be_read_or_priced_are_left_out_of_the_note(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 megapixels: over the reader's limit
    (tmp_path / "photo.jpg").write_text("not a photo")
    h = handlers(tmp_path)
    assert h.attachments_note({"files": [str(bomb), str(tmp_path / "photo.jpg")]}, 4, None, 1) == ""
    assert handlers(tmp_path, modalities=()).detail_note(4, (640, 480)) == ""  # a text-only model


def test_the_voice_panel_says_how_long_a_recording_can_be(tmp_path):
    # The scripted engine prices any clip at 13 tokens: (4096 - 512) / 13 = 275.7 "minutes".
    assert handlers(tmp_path).recording_note() == "At this context (4,096 tokens) a recording can be up to about 276 min long."
    assert handlers(tmp_path, modalities=("image",)).recording_note() == ""
