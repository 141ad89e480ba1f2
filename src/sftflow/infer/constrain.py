"""Grammar-constrained decoding with llguidance (`pip install sftflow[serve]`).

Why llguidance: it is the structured-output engine behind llama.cpp, vLLM and SGLang's grammar backends,
a small Rust wheel with no heavy dependency (xgrammar pulls in triton, ~1 GB; lm-format-enforcer does not
import with transformers 5), it runs on CPU, computes each step's token mask in microseconds, and takes
JSON Schema and Lark grammars with JSON Schema embedded (`%json {...}`), which forced tool calls need.

A grammar is an llguidance grammar string (`json_schema_grammar`, `lark_grammar`); `GrammarProcessor`
masks the logits of `generate` so that the answer matches it, then allows only the stop tokens.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from sftflow.errors import SftflowError

if TYPE_CHECKING:  # (the API's light modules import this one)
    import torch
    from transformers import PreTrainedTokenizerBase

_TOKENIZERS: dict[tuple[int, int], Any] = {}
_LOCK = threading.Lock()


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        raise SftflowError(
            "response_format json_object/json_schema and forced tool calls need llguidance: "
            "pip install 'sftflow[serve]'."
        ) from None
    return llguidance


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of JSON documents matching `schema` (`{"type": "object"}` for any JSON object).

    Raises:
        SftflowError: the schema is not one llguidance can compile (the message says why).
    """
    ll = _llguidance()
    grammar = ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    check_grammar(grammar)
    return grammar


def lark_grammar(lark: str) -> str:
    """A grammar from Lark source (which may embed JSON Schema as `%json {...}`).

    Raises:
        SftflowError: the grammar does not compile.
    """
    grammar = _llguidance().grammar_from("lark", lark)
    check_grammar(grammar)
    return grammar


def json_literal(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text)


def check_grammar(grammar: str) -> None:
    """Raises SftflowError naming the problem when `grammar` does not compile."""
    error = _llguidance().LLMatcher.validate_grammar(grammar)
    if error:
        raise SftflowError(f"the schema cannot be enforced: {error}")


def _ll_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab: int, stop_ids: list[int]) -> Any:
    key = (id(tokenizer), vocab)
    with _LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = _llguidance().hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=stop_ids)
        return _TOKENIZERS[key]


class GrammarProcessor:
    """A `generate` logits processor (batch of one) that allows only tokens the grammar accepts next."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, grammar: str, stop_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.stop_ids = stop_ids
        self.matcher: Any = None
        self.mask: Any = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ll = _llguidance()
        if self.matcher is None:
            lltok = _ll_tokenizer(self.tokenizer, scores.shape[-1], self.stop_ids)
            self.matcher = ll.LLMatcher(lltok, self.grammar)
            self.mask = ll.torch.allocate_token_bitmask(1, lltok.vocab_size)
        else:
            last = int(input_ids[0, -1])
            if not self.matcher.is_stopped():
                self.matcher.consume_token(last)
        if self.matcher.is_error():
            raise SftflowError(f"constrained decoding failed: {self.matcher.get_error()}")
        ll.torch.fill_next_token_bitmask(self.matcher, self.mask, 0)
        ll.torch.apply_token_bitmask_inplace(scores, self.mask.to(scores.device))
        return scores
