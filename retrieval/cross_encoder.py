"""A cross-encoder over (question, chunk) pairs: the probability that the chunk answers the question.

No cross-encoder weights ship on PyPI, so the project trains its own (``rag train reranker``,
generation/finetune/answerability.py): the bundled encoder's weights as a BERT sequence classifier with
one logit, a LoRA adapter on its attention and feed-forward layers, and a new classification head. A
trained model is a folder of a few MB (peft's ``adapter_model.safetensors`` with the head, and
``metadata.json`` naming the base encoder and ``max_length``); loading puts it on the base weights and
merges it. Versions live in a registry like the generator's adapters (``rerankers/<name>/<version>``).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

METADATA = "metadata.json"


class CrossEncoderScorer:
    """``score(question, texts)`` -> one probability per text, in order; thread-safe, built once."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int, name: str = "", device: str = "cpu") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.name = name
        self.device = device
        self._lock = threading.Lock()  # one forward at a time: torch already uses every core for one

    @classmethod
    def load(cls, folder: Path, base_path: str, *, name: str = "", device: str = "cpu") -> "CrossEncoderScorer":
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        metadata = read_metadata(folder)
        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
        model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload().to(device)
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        return cls(model, tokenizer, max_length=int(metadata.get("max_length", 256)), name=name or folder.name,
                   device=device)

    def logits(self, question: str, texts: Sequence[str], batch_size: int = 16) -> list[float]:
        out: list[float] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = list(texts[start:start + batch_size])
                encoded = self.tokenizer([question] * len(batch), batch, truncation="only_second",
                                         max_length=self.max_length, padding=True, return_tensors="pt").to(self.device)
                out += self.model(**encoded).logits[:, 0].float().tolist()  # (batch,)
        return out

    def score(self, question: str, texts: Sequence[str]) -> list[float]:
        return [1.0 / (1.0 + math.exp(-x)) for x in self.logits(question, texts)]


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {METADATA}; not a trained cross-encoder folder")
    return cast(dict[str, Any], json.loads(path.read_text(encoding="utf-8")))
