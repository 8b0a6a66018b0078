"""The model card a training run writes last: `starrec.llm.card`.

It lives with the model loader, which follows a card's `base_model` and sits below
training; the names stay importable from here.
"""

from starrec.llm.card import CARD_FILE, ModelCard, read_model_card, write_model_card  # noqa: F401
