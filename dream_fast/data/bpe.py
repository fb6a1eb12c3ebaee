"""BPE text tokenizer for the contrastive text tower, over HF `tokenizers`.

Loads any tokenizer.json (CLIP's included) or trains a byte-level BPE on captions; encodes to
fixed-context id rows [sot, tokens..., eot, pad...] with eot always kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class BPETokenizer:
    """A `tokenizers.Tokenizer` plus start/end/pad ids and fixed-context batch encoding.

    The text tower pools at the first position where ids == eot_id; encode() guarantees that
    position exists in every row (context - 1 at the latest).
    """

    def __init__(self, tokenizer: Tokenizer, sot_id: int, eot_id: int, pad_id: int):
        self.tokenizer = tokenizer
        # Padding/truncation baked into a tokenizer.json would fight our own layout.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._sot, self._eot, self._pad = sot_id, eot_id, pad_id

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        sot_token: str | None = None,
        eot_token: str | None = None,
        pad_token: str | None = None,
    ) -> BPETokenizer:
        """Load a tokenizer.json. Start/end tokens default to <|startoftext|>/<|endoftext|>;
        the pad token defaults to <|pad|> when the vocabulary has it, else the end token
        (as CLIP pads), which keeps "first eot" pooling correct."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path} (expected a tokenizer.json)")
        tok = Tokenizer.from_file(str(path))

        def find(name: str | None, default: str, role: str, required: bool = True) -> int | None:
            want = name or default
            idx = tok.token_to_id(want)
            if idx is None and required:
                raise ValueError(
                    f"{path}: {role} token {want!r} is not in the vocabulary; pass {role}_token= "
                    "with the name this tokenizer uses"
                )
            return idx

        sot = find(sot_token, SOT_TOKEN, "sot")
        eot = find(eot_token, EOT_TOKEN, "eot")
        pad = find(pad_token, PAD_TOKEN, "pad", required=pad_token is not None)
        return cls(tok, sot, eot, eot if pad is None else pad)

    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int, save_path: str | os.PathLike | None = None
    ) -> BPETokenizer:
        """Train a lowercasing byte-level BPE with <|startoftext|>, <|endoftext|>, <|pad|>.

        The result may hold fewer than `vocab_size` tokens when the captions allow fewer merges
        (check `.vocab_size` against the model's vocabulary)."""
        if vocab_size < 256 + 3:
            raise ValueError(f"vocab_size must be >= 259 (256 bytes + 3 special tokens), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[SOT_TOKEN, EOT_TOKEN, PAD_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(captions, trainer=trainer)
        out = cls(tok, tok.token_to_id(SOT_TOKEN), tok.token_to_id(EOT_TOKEN), tok.token_to_id(PAD_TOKEN))
        if save_path is not None:
            out.save(save_path)
        return out

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))

    # ---- properties --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def sot_id(self) -> int:
        return self._sot

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def pad_id(self) -> int:
        return self._pad

    # ---- encode / decode ---------------------------------------------------------------------

    def encode(
        self, texts: Sequence[str] | str, context: int, return_truncated: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids_BT (B, context) LongTensor: [sot] + tokens + [eot] + [pad]*.

        Captions too long for the context are cut so that eot sits at position context - 1.
        With return_truncated, also returns a BoolTensor (B,) marking the cut rows. A single
        string is treated as a batch of one.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context < 2:
            raise ValueError(f"context must be >= 2 (room for sot and eot), got {context}")
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode expects a list of str, got elements of type {sorted(set(bad))}")
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        ids_BT = torch.full((len(encs), context), self._pad, dtype=torch.long)
        truncated_B = torch.zeros(len(encs), dtype=torch.bool)
        for b, enc in enumerate(encs):
            toks = enc.ids
            if len(toks) > context - 2:
                toks = toks[: context - 2]
                truncated_B[b] = True
            row = [self._sot, *toks, self._eot]
            ids_BT[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return (ids_BT, truncated_B) if return_truncated else ids_BT

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of one row (1-D ids -> str) or of each row (2-D -> list[str]): sot is skipped and
        decoding stops at the first eot; pad and other special tokens are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if len(ids) > 0 and isinstance(ids[0], (list, tuple)):
            return [self._decode_row(r) for r in ids]
        return self._decode_row(list(ids))

    def _decode_row(self, row: list[int]) -> str:
        if row and row[0] == self._sot:
            row = row[1:]
        if self._eot in row:
            row = row[: row.index(self._eot)]
        row = [i for i in row if i not in (self._pad, self._sot)]
        return self.tokenizer.decode(row, skip_special_tokens=True)

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, sot_id={self._sot}, eot_id={self._eot}, "
                f"pad_id={self._pad})")  # fmt: skip
