"""The web app: `layout` places the components, `handlers` say what each event does on the
conversation core (app/conversation.py), `page` connects them, `render` turns a conversation
into chat messages, `speech_out` speaks answers with espeak-ng, `push_to_talk.js` holds the
microphone while Space or the button is held. Started by `launch.py` through `server`."""
