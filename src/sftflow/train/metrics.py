"""Text-similarity metrics of generated answers: ROUGE-1/2/L F1 and BLEU-4, each x100, averaged.

Tokenisation (the same for both metrics, English and Chinese alike): lower-cased; every CJK character
is one token; other text is split into runs of letters/digits (`\\w+`); punctuation is dropped.
ROUGE comes from `rouge-score` (no stemming); BLEU-4 is NLTK's sentence BLEU with smoothing method 3.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_TOKEN = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+", re.UNICODE
)


def tokenize(text: str) -> list[str]:
    """Split text into metric tokens.

    >>> tokenize("Hello, World! 你好")
    ['hello', 'world', '你', '好']
    """
    return _TOKEN.findall(text.lower())


class _RougeTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Average ROUGE-1/2/L F1 and BLEU-4 (x100) over aligned prediction/reference pairs.

    An empty prediction or reference scores 0 on every metric.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_score.rouge_scorer import RougeScorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_RougeTokenizer())
    smoothing = SmoothingFunction().method3
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        pred_tokens, ref_tokens = tokenize(prediction), tokenize(reference)
        if not pred_tokens or not ref_tokens:
            continue
        scores = scorer.score(reference, prediction)
        totals["rouge-1"] += scores["rouge1"].fmeasure
        totals["rouge-2"] += scores["rouge2"].fmeasure
        totals["rouge-l"] += scores["rougeL"].fmeasure
        totals["bleu-4"] += sentence_bleu([ref_tokens], pred_tokens, smoothing_function=smoothing)
    n = max(len(predictions), 1)
    return {key: round(100 * value / n, 4) for key, value in totals.items()}
