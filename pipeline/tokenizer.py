"""Tokenizers: byte-level and BPE, both stored as a Hugging Face `tokenizer.json`.

Both kinds are `tokenizers.Tokenizer` objects with a byte-level alphabet, so any Unicode text
round-trips exactly and decoding arbitrary ids never raises. The byte tokenizer maps byte b to
id b (256 ids) and puts the special tokens after them; BPE is trained on the corpus with the
`tokenizers` library.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pipeline.config import ConfigError, TokenizerConfig

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# Chat role markers: every tokenizer has them from the start, so fine-tuning never grows the
# vocabulary of a pre-trained model.
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
FILENAME = "tokenizer.json"
IMPORTED_CONFIG = "tokenizer_config.json"  # Hugging Face's: special token names, chat template
GENERATION_EOS = "generation_eos_token_ids"  # in IMPORTED_CONFIG: generation_config's end ids


class TokenizerProtocol(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str: ...


class Tokenizer:
    """A thin, typed wrapper over `tokenizers.Tokenizer` with our special tokens.

    A tokenizer brought from elsewhere (`imported`, e.g. a Hugging Face model's) is used as it
    is: nothing is added to its vocabulary, its end-of-text token comes from its
    `tokenizer_config.json`, its conversations render with its own chat template (a
    conversation without one is refused, never laid out in role markers the model never saw),
    and the end ids of its `generation_config.json` stop generation too (`stop_ids`).
    """

    def __init__(self, hf: HFTokenizer, imported: dict | None = None):
        self.hf = hf
        self.imported = imported
        if imported is None:
            missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
            if missing:
                self.hf.add_special_tokens(missing)
        names = imported or {}

        def special(key: str, default: str) -> int | None:
            token = names.get(key, default)
            if isinstance(token, dict):  # {"content": "<|endoftext|>", ...}
                token = token.get("content")
            return hf.token_to_id(token) if isinstance(token, str) else None

        self.pad_id = special("pad_token", PAD)
        self.bos_id = special("bos_token", BOS)
        self.eos_id = special("eos_token", EOS)
        self.end_id = hf.token_to_id(END)
        if self.end_id is None:
            self.end_id = self.eos_id
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        self.role_ids = {role: hf.token_to_id(token) for role, token in ROLES.items()}
        # end ids beyond eos_id: generation_config.json's eos_token_id (e.g. Llama 3's end of
        # turn beside its end of text), kept by import-hf under this key
        extra = names.get(GENERATION_EOS, [])
        extra = extra if isinstance(extra, list) else [extra]
        self.stop_ids = frozenset(i for i in (self.eos_id, *extra) if i is not None)
        self.template_override: str | None = None  # a user's template (--chat-template FILE)
        self._texts: dict[int, str] = {}
        # id b is byte b, and every added token's text holds "<|" (a text without it is its
        # bytes: `encode`'s and `encode_batch`'s fast path)
        self._fast_bytes = (
            self.is_byte_level
            and all(hf.id_to_token(b) == ch for b, ch in enumerate(_bytes_to_unicode()))
            and all("<|" in t.content for t in hf.get_added_tokens_decoder().values())
        )

    def chat_template(self, tools: bool = False) -> str | None:
        """The Jinja template a conversation renders with, as transformers picks it: the
        user's (`template_override`), else the model's own (of several named ones, `tool_use`
        when tools are offered and it has one, else `default`). None: this project's role
        markers (a tokenizer it trained). An imported tokenizer without a template raises."""
        if self.template_override is not None:
            return self.template_override
        if self.imported is None:
            return None
        templates = self.imported.get("chat_template")
        if isinstance(templates, list):  # [{"name": ..., "template": ...}]
            templates = {t["name"]: t["template"] for t in templates}
        if isinstance(templates, dict):
            name = "tool_use" if tools and "tool_use" in templates else "default"
            if name not in templates:
                raise ValueError(
                    f"the model's chat templates are {sorted(templates)}, none named 'default'; "
                    "give one with --chat-template FILE (serve.chat_template)"
                )
            return templates[name]
        if not templates:
            raise ValueError(
                "this model has no chat template (none in its tokenizer_config.json, "
                "chat_template.jinja or chat_template.json), so a conversation cannot be laid "
                "out as it was trained; give one with --chat-template FILE (serve.chat_template "
                "for the server, import-hf --chat-template to keep it in the run), or send a "
                "plain completion"
            )
        return templates

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def is_byte_level(self) -> bool:
        """True when every non-special id is one byte (bits per byte then equals bits per token)."""
        model = json.loads(self.hf.model.__getstate__())
        return model.get("type") == "BPE" and not model.get("merges") and len(model["vocab"]) == 256

    def encode(self, text: str) -> list[int]:
        if self._fast_bytes and "<|" not in text:  # id b is byte b (as in `encode_batch`)
            return list(text.encode("utf-8"))
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of many texts, as arrays; the byte tokenizer takes a fast exact path."""
        if self._fast_bytes:
            # Id b is byte b, so the UTF-8 bytes are the ids, unless a special token's text occurs.
            return [
                np.frombuffer(t.encode("utf-8"), np.uint8)
                if "<|" not in t
                else np.array(self.encode(t))
                for t in texts
            ]
        return [np.array(e.ids) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        vocab = self.vocab_size  # (a call into the library: once, not per id)
        ids = [int(i) for i in ids if 0 <= int(i) < vocab]
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a special token: its text), whether or not they are
        valid UTF-8 alone: what logprobs report per token."""
        piece = self.hf.id_to_token(int(token))
        if piece is None:
            return b""
        decoder = self.hf.decoder
        if decoder is not None and b'"ByteLevel"' in decoder.__getstate__():
            alphabet = _byte_alphabet()
            if all(ch in alphabet for ch in piece):
                return bytes(alphabet[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
            return bytes([int(piece[3:5], 16)])
        return self.decode([token], skip_special=False).encode("utf-8")

    def token_text(self, token: int) -> str:
        """One token as text; bytes that are not UTF-8 alone as "bytes:\\xe2\\x80" (as OpenAI
        writes them), so two tokens never share a text. Memoised: logprobs ask for many."""
        token = int(token)
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self._token_text(token)
        return text

    def _token_text(self, token: int) -> str:
        if self.hf.id_to_token(token) is None:  # past the vocabulary (a padded embedding)
            return f"<unused:{token}>"
        raw = self.token_bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))
        if self.imported is not None:
            (path.parent / IMPORTED_CONFIG).write_text(json.dumps(self.imported, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """`tokenizer.json` (a file or the directory holding it); a `tokenizer_config.json`
        beside it marks a tokenizer imported as it is."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise ConfigError(f"tokenizer file not found: {path}")
        extra = path.parent / IMPORTED_CONFIG
        imported = json.loads(extra.read_text()) if extra.is_file() else None
        return cls(HFTokenizer.from_file(str(path)), imported)

    def fingerprint(self) -> str:
        """A string that changes whenever the token ids of any text would change."""
        return self.hf.to_str()


def _byte_level(model: models.Model) -> HFTokenizer:
    hf = HFTokenizer(model)
    # use_regex=False: no word splitting, so the byte tokenizer is exactly one id per byte.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def byte_tokenizer() -> Tokenizer:
    """256 byte ids (id b is byte b) followed by the special tokens."""
    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    hf = _byte_level(models.BPE(vocab=vocab, merges=[]))
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(hf)


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style word splitting) on `texts`."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def build_tokenizer(
    cfg: TokenizerConfig, texts: Iterable[str] = (), vocab_size: int = 0
) -> Tokenizer:
    """The tokenizer a config asks for: loaded from `path`, a byte tokenizer, or trained BPE."""
    if cfg.path:
        return Tokenizer.load(cfg.path)
    if cfg.kind == "byte":
        return byte_tokenizer()
    return train_bpe(iter(texts), cfg.vocab_size or vocab_size)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte, the alphabet of `ByteLevel`."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@cache
def _byte_alphabet() -> dict[str, int]:
    return {ch: b for b, ch in enumerate(_bytes_to_unicode())}


def read_chat_template(path: str | Path) -> str:
    """A chat template from a file: a Jinja file's text, or a JSON file's `chat_template` (as
    in `chat_template.json`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"chat template file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            template = json.loads(text).get("chat_template")
        except (ValueError, AttributeError):
            template = None
        if not isinstance(template, str):
            raise ConfigError(f'{path}: no "chat_template" string in this JSON file')
        return template
    return text


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# Conversations: shared by fine-tuning (with loss masks), generation and serving.


def render(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and, per id, 1 where the loss counts it (assistant turns).

    A tokenizer with a chat template renders the conversation with it (see
    `render_with_template`); ours writes role markers, contents and end markers.
    """
    template = tokenizer.chat_template()
    if template is not None:
        return render_with_template(tokenizer, template, messages)
    ids, trained = ([tokenizer.bos_id], [0]) if tokenizer.bos_id is not None else ([], [])
    for message in messages:
        assistant = message["role"] == "assistant"
        marker = role_marker(tokenizer, message["role"])
        body = [*tokenizer.encode(message["content"]), tokenizer.end_id]
        ids += marker + body
        trained += [0] * len(marker) + [int(assistant)] * len(body)  # the role marker is given
    return ids + [tokenizer.eos_id], trained + [0]


def role_marker(tokenizer: Tokenizer, role: str) -> list[int]:
    """The role's special token, or (a tokenizer imported without them) the marker as text."""
    token = tokenizer.role_ids.get(role)
    return [token] if token is not None else tokenizer.encode(f"<|{role}|>\n")


def prompt_ids(
    tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None
) -> list[int]:
    """The ids that ask for the next assistant turn (for generation after fine-tuning).

    A tokenizer with a chat template (Hugging Face's Jinja `chat_template`, or the user's) uses
    it, as transformers' `apply_chat_template(..., add_generation_prompt=True)` would.
    """
    template = tokenizer.chat_template(tools=bool(tools))
    if template is not None:
        return tokenizer.encode(render_template(tokenizer, template, messages, tools=tools))
    ids, _ = render(tokenizer, messages)
    return ids[:-1] + role_marker(tokenizer, "assistant")


def render_with_template(
    tokenizer: Tokenizer, template: str, messages: list[dict]
) -> tuple[list[int], list[int]]:
    """A conversation as the model's own template lays it out, the assistant turns trained.

    Each assistant turn is what the template adds between the conversation before it (with the
    generation prompt: what the model is given) and the conversation through it, its end marker
    included; the tokens whose text lies inside such a span count for the loss.
    """
    text = render_template(tokenizer, template, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        given = render_template(tokenizer, template, messages[:i], add_generation_prompt=True)
        through = render_template(tokenizer, template, messages[: i + 1], False)
        if not (through.startswith(given) and text.startswith(through)):
            raise ValueError(
                "the chat template does not render a conversation as the prefixes of its turns, "
                "so the assistant turns cannot be located for the loss"
            )
        spans.append((len(given), len(through)))
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    trained = [
        int(any(start <= begin and end <= stop for start, stop in spans) and end > begin)
        for begin, end in encoding.offsets
    ]
    return list(encoding.ids), trained


def render_template(
    tokenizer: Tokenizer,
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> str:
    """Render a Hugging Face chat template as transformers' `apply_chat_template` does: the
    same sandboxed Jinja environment (loop controls, its `tojson`, `strftime_now`,
    `raise_exception`) and the tokenizer's special tokens as variables."""
    import datetime

    import jinja2.ext
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    token = lambda i: tokenizer.hf.id_to_token(i) if i is not None else ""  # noqa: E731
    special = {"bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id)}
    for name, value in (tokenizer.imported or {}).items():
        if name.endswith("_token") and value is not None:  # a string, or an AddedToken's dict
            special[name] = value["content"] if isinstance(value, dict) else value
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, **special
        )
    except TemplateError as err:
        raise ValueError(f"the chat template refused this conversation: {err}") from None
