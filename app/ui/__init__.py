"""The web app: `page` builds the Gradio Blocks, `render` turns a conversation into chat
messages, `speech_out` speaks answers with espeak-ng, `push_to_talk.js` holds the microphone
while Space or the button is held. Started by `launch.py`."""
