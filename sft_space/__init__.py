"""SFT Space: turn your own prompt/response data into your assistant.

The package reads as the data flows: data (read and normalise) → checks (the report) → render (chat
template and trained-token mask) → models (where weights come from) → ... The CLI and the app are thin
skins over these modules.
"""

__version__ = "0.1.0"
