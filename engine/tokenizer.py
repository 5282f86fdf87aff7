"""Tokenizer, chat template and incremental detokenizer of a model folder.

Uses the `tokenizers` library directly (tokenizer.json), not transformers.
Chat templates are rendered in jinja2's ImmutableSandboxedEnvironment and
come only from the model folder, never from a request.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream


class ChatTemplateError(ValueError):
    """A chat request the template cannot render (the template raised, or no template)."""


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


class Tokenizer:
    """Encode, decode and render chat prompts for one model.

    Args:
        folder: a Hugging Face model folder with tokenizer.json and, optionally,
            tokenizer_config.json (special tokens, chat template) or chat_template.jinja.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self._tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()))
        jinja_path = folder / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text()
        self.chat_template: str | None = template
        self._compiled = None
        if template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii
            )
            self._compiled = env.from_string(template)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {
            self._tok.token_to_id(t.content) for t in self._tok.get_added_tokens_decoder().values() if t.special
        }
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_id: int | None = eos_id

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what grammar engines build their vocabulary from)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template renders a `tools` list itself (else tools go in a system message)."""
        return self.chat_template is not None and "tools" in self.chat_template

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """Render OpenAI-style messages (and the tools on offer, for a template that takes them) into
        the model's prompt text."""
        if self._compiled is None:
            raise ChatTemplateError("this model has no chat template; send a plain prompt instead")
        try:
            return self._compiled.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                tools=list(tools) if tools else None,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e

    def new_detokenizer(self, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_token_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns generated token ids into text one token at a time.

    Built on tokenizers' DecodeStream, which holds back bytes until a UTF-8
    character is whole. The stream starts from the prompt's last tokens so
    that leading spaces decode as they would in the full text.
    """

    # Prompt tokens given to the stream as context.
    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._context = list(prompt_token_ids[-self.CONTEXT_TOKENS :])
        self._stream = self._new_stream(self._context)
        self._ids: list[int] = []
        self.text = ""

    def _new_stream(self, prefix: list[int]) -> DecodeStream:
        return DecodeStream(prefix or None, skip_special_tokens=self._skip_special)

    def step(self, token_id: int) -> str:
        """Feed one token; returns the text it completes (possibly empty)."""
        self._ids.append(token_id)
        try:
            piece = self._stream.step(self._tokenizer._tok, token_id)
        except Exception:
            # The stream rejects some prefixes (an invalid byte sequence): rebuild
            # it from the full decoded text so far and carry on.
            full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special)
            piece = full[len(self.text) :] if full.startswith(self.text) else ""
            self._stream = self._new_stream(self._context + self._ids)
        piece = piece or ""
        self.text += piece
        return piece
