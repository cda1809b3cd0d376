"""The small NFormer shipped in ``export/data/`` (trained on the synthetic data; card beside it)."""
from __future__ import annotations

import json
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "data" / "nformer_synthetic.pth"
SHIPPED_CARD = SHIPPED.with_suffix(".json")


def shipped_card() -> dict:
    return json.loads(SHIPPED_CARD.read_text())


def shipped_training_split() -> tuple[int, int] | None:
    """``(identities, seed)`` of the ``runtime synth`` data the shipped model was trained on (its
    training half), or None where the card does not say."""
    data = shipped_card().get("data", {})
    identities, seed = data.get("identities"), data.get("seed")
    return (identities, seed) if isinstance(identities, int) and isinstance(seed, int) else None
