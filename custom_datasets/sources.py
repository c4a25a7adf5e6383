"""Tokenizer and raw-text sources: hub ids by default, local paths everywhere, bundled copies offline.

Bundled (data/README.md): the GPT-NeoX-20B tokenizer, and WikiText-2 raw test/validation (the
same bytes as the hub's splits). A hub source that is neither bundled nor cached fails within
seconds, naming the id and what to pass instead (models/hub.py).
"""
from __future__ import annotations

import os

from engine.errors import BadFileError
from models.hub import HubUnavailableError, hub_reachable, resolve_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_TOKENIZER = os.path.join(REPO, "data", "gpt-neox-20b", "tokenizer.json")
BUNDLED_WIKITEXT = os.path.join(REPO, "data", "wikitext-2-raw")
GPT_NEOX = "EleutherAI/gpt-neox-20b"
WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "valid": "wiki.valid.raw",
                  "test": "wiki.test.raw"}


class Tokenizer:
    """A thin wrapper over a ``tokenizers`` BPE: no special tokens are added; eos = <|endoftext|>."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok

        self.path = path
        try:
            self._tok = _Tok.from_file(path)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a damaged file
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise BadFileError(f"{path}: not a readable tokenizer.json ({first}); pass a GPT-NeoX "
                               f"tokenizer.json or a directory holding one (--set tokenizer=PATH)") from None
        self.eos_token = "<|endoftext|>"
        self.eos_token_id = self._tok.token_to_id(self.eos_token)
        if self.eos_token_id is None:
            raise ValueError(f"tokenizer {path!r} has no {self.eos_token} token; a GPT-NeoX tokenizer is expected")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str) -> None:
        self._tok.save(os.path.join(directory, "tokenizer.json"))


def load_tokenizer(name_or_path: str, cache_dir=None, checkpoint_dir=None) -> Tokenizer:
    """A tokenizer.json path, a directory holding one, a hub id; GPT-NeoX-20B comes bundled."""
    hint = "a local tokenizer.json or a directory holding one (--set tokenizer=PATH)"
    if os.path.isfile(name_or_path):
        return Tokenizer(name_or_path)
    if name_or_path == GPT_NEOX and os.path.isfile(BUNDLED_TOKENIZER):
        return Tokenizer(BUNDLED_TOKENIZER)     # the same tokenizer; no network needed
    path = resolve_file(name_or_path, "tokenizer.json", cache_dir, "tokenizer", hint)
    if path is None:
        raise FileNotFoundError(f"tokenizer {name_or_path!r} has no tokenizer.json; pass {hint}")
    return Tokenizer(path)


def wikitext_rows(dataset: str, split: str, cache_dir=None, key: str = "niah_noise_split_eval") -> list[str]:
    """Rows as the HF ``wikitext`` loader gives them: each non-blank line + '\\n', blank lines ''.

    dataset: 'wikitext/<config>' (hub; the bundled copy serves wikitext-2-raw-v1 test/validation,
    whose bytes equal the hub's) or a directory holding wiki.<split>.raw files.
    """
    fname = WIKITEXT_FILES.get(split)
    if fname is None:
        raise ValueError(f"wikitext split {split!r} is not valid; choose one of ['train', 'validation', 'test']")
    if os.path.isdir(dataset):
        path = os.path.join(dataset, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} does not exist: niah_noise_dataset={dataset!r} must hold {fname}")
        return _raw_rows(path)
    if dataset in ("wikitext/wikitext-2-raw-v1", "wikitext/wikitext-103-raw-v1") and split != "train":
        return _raw_rows(os.path.join(BUNDLED_WIKITEXT, fname))
    if not dataset.startswith("wikitext/"):
        raise ValueError(f"niah_noise_dataset={dataset!r}: expected 'wikitext/<config>' or a local directory")
    ds = load_hf_dataset(dataset.split("/", 1)[0], dataset.split("/", 1)[1], split, cache_dir,
                         hint=f"a directory holding {fname} as niah_noise_dataset, or a bundled split "
                              f"(--set {key}=validation)")
    return list(ds["text"])


def _raw_rows(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as exc:
        raise BadFileError(f"{path}: not UTF-8 text (byte {exc.start}); pass a directory of WikiText-2 "
                           f"raw files (wiki.<split>.raw) as niah_noise_dataset") from None
    if lines and lines[-1] == "":
        lines.pop()
    return [line + "\n" if line.strip() else "" for line in lines]


def load_hf_dataset(path: str, name: str | None, split: str, cache_dir=None, hint: str = "a local file"):
    """datasets.load_dataset, imported lazily, failing fast when the hub is unreachable."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"loading {path!r} from the hub needs the 'datasets' package (pip install datasets); "
                          f"or pass {hint}") from None
    ok, why = hub_reachable()
    if not ok:      # use the local cache only: no 20-50 s of retries against a dead endpoint
        datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(path, name, split=split, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types when offline
        if not ok:
            raise HubUnavailableError(f"cannot load dataset {path!r} ({name}, split {split}): the hub is not "
                                      f"reachable ({why}) and it is not cached. Pass {hint} instead.") from None
        raise RuntimeError(f"loading dataset {path!r} ({name}, split {split}) failed: {exc}") from exc
