"""A compact, order-preserving view of open_clip's BPE tokenizer for the embedded model.

A tiny text tower would spend most of its step in the 49408-row token embedding. We keep the BPE
tokenisation but renumber the ids it can produce for our captions into a small vocabulary:

    0 = padding, 1 = unknown, 2 ... V-1 = the used BPE ids in increasing order.

Order is preserved, so end-of-text (BPE id 49407, the largest) stays the largest compact id: open_clip
pools the text features at ``tokens.argmax(-1)`` and relies on exactly that.

Every word outside the vocabulary becomes the one unknown id, so class names made of such words get
identical zero-shot head rows ("cat" and "dog": a 2-class head that cannot tell them apart, a loss stuck at
ln 2). :func:`check_task_texts` refuses them — with the task, the class name or template, and the words —
where a head is built for a task. ``python -m modeling.tokenizer`` lists the words the shipped model knows.
"""

from __future__ import annotations

import torch
from open_clip.tokenizer import SimpleTokenizer

PAD, UNK = 0, 1

__all__ = ["PAD", "UNK", "CompactTokenizer", "UnknownWordsError", "check_task_texts"]

FIX = ("use words it knows (python -m modeling.tokenizer lists them) or a base model with open_clip's full "
       "tokenizer (e.g. ViT-B-32)")


class UnknownWordsError(ValueError):
    """Task texts the embedded model's vocabulary cannot represent; the message names the task, the text and the words."""


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
        self._known = frozenset(self.bpe_ids)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        tokens = self.bpe([texts] if isinstance(texts, str) else list(texts), context_length=self.context_length)
        return torch.where(tokens == 0, torch.zeros_like(tokens), self.table[tokens])

    def words(self, text: str) -> list[str]:
        """``text`` as the BPE tokenizer splits it: cleaned, lower-cased words, single digits, punctuation runs."""
        return self.bpe.pat.findall(self.bpe.clean_fn(text))

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` (see :meth:`words`, each once, in order) with a BPE piece outside the vocabulary."""
        return [w for w in dict.fromkeys(self.words(text)) if not self._known.issuperset(self.bpe.encode(w))]

    def n_tokens(self, text: str) -> int:
        """Tokens of ``text`` with start and end of text; beyond ``context_length`` the prompt is cut."""
        return len(self.bpe.encode(text)) + 2

    @classmethod
    def from_texts(cls, texts: list[str], context_length: int = 32) -> "CompactTokenizer":
        """The vocabulary of every BPE id that ``texts`` use."""
        bpe = SimpleTokenizer(context_length=context_length)
        ids = sorted({i for t in texts for i in bpe.encode(t)})
        return cls(ids, context_length)


def _quoted(words: list[str]) -> str:
    return ", ".join(repr(w) for w in words)


def check_task_texts(tokenizer, task) -> None:
    """Refuse a task (``TaskSpec``) whose zero-shot head ``tokenizer`` would build wrong; call before building it.

    Any tokenizer: a task without class names (the head would have no rows). The embedded model's
    :class:`CompactTokenizer`: class names, templates, or the prompts made of both, with words outside its
    vocabulary (they all become one unknown token), and prompts longer than its context (they are cut).
    Only registered tasks are checked: the off-task attack's shadow heads are unregistered ``TaskSpec``s
    whose extra names are kept apart by tokenisation on purpose (``default_shadow_classnames``).
    Raises :class:`UnknownWordsError` (a ``ValueError``) with one line.
    """
    from datamodules.tasks import TASKS

    if not task.classnames:
        raise UnknownWordsError(f"task {task.name!r} has no class names, so its zero-shot head has no rows: list "
                                "them, or read them from its folders (a task file with classnames: from_folders)")
    if not isinstance(tokenizer, CompactTokenizer) or TASKS.get(task.name) != task:
        return
    where = f"task {task.name!r}"
    lacking = f"has words the embedded model's vocabulary lacks (each becomes its one unknown token): {{}}; {FIX}"
    bad = [(c, tokenizer.unknown_words(c)) for c in task.classnames]
    bad = [(c, w) for c, w in bad if w]
    if bad:
        more = f" (and {len(bad) - 1} more class names)" if len(bad) > 1 else ""
        raise UnknownWordsError(f"{where}: class name {bad[0][0]!r}{more} " + lacking.format(_quoted(bad[0][1])))
    for t in task.templates:
        prompts = [t.format(c) for c in task.classnames]
        unknown = [tokenizer.unknown_words(p) for p in prompts]
        common = [w for w in unknown[0] if all(w in u for u in unknown[1:])]
        if common:  # in every prompt: the template's own words
            raise UnknownWordsError(f"{where}: template {t!r} " + lacking.format(_quoted(common)))
        for c, prompt, words in zip(task.classnames, prompts, unknown):
            if words:  # the class name glued to the template's letters: 'a photo of {}s.' with 'square'
                raise UnknownWordsError(f"{where}: prompt {prompt!r} (template {t!r}, class name {c!r}) "
                                        + lacking.format(_quoted(words)))
            n = tokenizer.n_tokens(prompt)
            if n > tokenizer.context_length:
                raise UnknownWordsError(f"{where}: prompt {prompt!r} is {n} tokens, more than the embedded model's "
                                        f"context of {tokenizer.context_length} (the rest is cut): shorten the class "
                                        "name or the template")


def _main() -> None:
    """Print the words the shipped embedded model knows: those of the captions its vocabulary was built from."""
    from datamodules.synthetic import caption_vocabulary
    from modeling.clip import load_base_model

    tokenizer = load_base_model().tokenizer
    words = {w for text in caption_vocabulary() for w in tokenizer.words(text)}
    print(" ".join(sorted(w for w in words if not tokenizer.unknown_words(w))))


if __name__ == "__main__":
    _main()
