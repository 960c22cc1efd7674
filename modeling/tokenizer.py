"""A compact, order-preserving view of open_clip's BPE tokenizer for the embedded model.

A tiny text tower would spend most of its step in the 49408-row token embedding. We keep the BPE
tokenisation but renumber the ids it can produce for our captions into a small vocabulary:

    0 = padding, 1 = unknown, 2 ... V-1 = the used BPE ids in increasing order.

Order is preserved, so end-of-text (BPE id 49407, the largest) stays the largest compact id: open_clip
pools the text features at ``tokens.argmax(-1)`` and relies on exactly that.
"""

from __future__ import annotations

import torch
from open_clip.tokenizer import SimpleTokenizer

PAD, UNK = 0, 1


class CompactTokenizer:
    """``tokenizer(texts) -> LongTensor (len(texts), context_length)`` over a compact vocabulary.

    ``bpe_ids`` are the BPE ids kept (sorted inside); any other id maps to ``UNK``.
    """

    def __init__(self, bpe_ids: list[int], context_length: int = 32):
        self.bpe = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.bpe_ids = sorted(set(int(i) for i in bpe_ids) | {self.bpe.sot_token_id, self.bpe.eot_token_id})
        self.table = torch.full((len(self.bpe.encoder),), UNK, dtype=torch.long)
        self.table[torch.tensor(self.bpe_ids)] = torch.arange(2, 2 + len(self.bpe_ids))
        self.vocab_size = 2 + len(self.bpe_ids)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        tokens = self.bpe([texts] if isinstance(texts, str) else list(texts), context_length=self.context_length)
        return torch.where(tokens == 0, torch.zeros_like(tokens), self.table[tokens])

    @classmethod
    def from_texts(cls, texts: list[str], context_length: int = 32) -> "CompactTokenizer":
        """The vocabulary of every BPE id that ``texts`` use."""
        bpe = SimpleTokenizer(context_length=context_length)
        ids = sorted({i for t in texts for i in bpe.encode(t)})
        return cls(ids, context_length)
