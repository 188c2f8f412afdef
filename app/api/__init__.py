"""The OpenAI-compatible HTTP API (`python -m app.api`, or under /v1 beside the page).

`server` has the routes, `schemas` the request models, `messages` turns OpenAI messages into the
engine's, `audio` serves the Whisper-style transcription routes, `metrics` the Prometheus text.
"""
