"""The small NFormer shipped in ``export/data/`` (trained on the synthetic data; card beside it)."""
from __future__ import annotations

import json
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "data" / "nformer_synthetic.pth"
SHIPPED_CARD = SHIPPED.with_suffix(".json")


def shipped_card() -> dict:
    return json.loads(SHIPPED_CARD.read_text())
