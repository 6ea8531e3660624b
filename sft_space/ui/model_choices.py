"""The model dropdown's entries: each model the catalog offers, labelled with its size and whether it fits here."""

from __future__ import annotations

from .. import catalog
from ..hardware import Hardware

# The embedded default's short name in the dropdown (its id is a local file's path when it is built in).
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def picker_choices(hardware: Hardware) -> list[tuple[str, str]]:
    """(label, model id) pairs for the model dropdown."""
    choices = []
    for offer in catalog.offers(hardware):
        name = offer.model_id
        if offer.embedded:
            name = EMBEDDED_NAME + (" (built in)" if offer.built_in else "")
        choices.append((f"{name} · {catalog.size_label(offer.parameters)} · {offer.verdict}", offer.model_id))
    return choices
