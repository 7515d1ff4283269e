"""Token ids and padded batches: the tokenizer that inference uses, each side truncated to
``max_seq_len`` with eos kept last, padded as numpy arrays (``PAD_ID``, labels ``LABEL_PAD_ID``)
and handed to torch without a copy. The loader (model/data/loader.py), `test` (use/scoring.py)
and the benches batch through here.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from model.data.tokenizer import LABEL_PAD_ID, PAD_ID, cut_texts, sentinel_ids, text_cut_chars


class TokenEncoder:
    """Strings -> token ids with the fast (Rust) tokenizer that inference uses, each truncated
    to max_seq_len with eos kept last; a text is first cut to the characters that can give those
    tokens (tokenizer.text_cut_chars), so a huge cell costs no more than a long row. Pickles as
    the tokenizer's JSON, for DataLoader workers."""

    def __init__(self, tokenizer, max_seq_len: int, truncate: bool = True):
        if max_seq_len < 2:
            raise ValueError(f'max_seq_len must be >= 2 (one token and eos), got {max_seq_len}')
        rust = getattr(tokenizer, 'backend_tokenizer', tokenizer)
        self.max_seq_len, self.truncate = max_seq_len, truncate
        self.eos_id = rust.token_to_id('</s>')
        self._json = rust.to_str()
        self._setup()

    def digest(self) -> str:
        """The tokenizer's SHA-256 (its JSON): what a count of its tokens depends on."""
        import hashlib

        return hashlib.sha256(self._json.encode('utf-8')).hexdigest()

    def _setup(self) -> None:
        from tokenizers import Tokenizer

        # a private copy: truncation settings on the shared tokenizer would leak to other users
        self._rust = Tokenizer.from_str(self._json)
        self._rust.no_padding()
        # training text is text: a literal '<extra_id_0>' in it is not a sentinel (nor any added token)
        self._rust.encode_special_tokens = True
        if self.truncate:  # whole documents (span corruption packs them) are not truncated
            self._rust.enable_truncation(self.max_seq_len)
        else:
            self._rust.no_truncation()
        self._cut_chars = text_cut_chars(self._rust, self.max_seq_len) if self.truncate else None
        self.sentinel_ids = sentinel_ids(self._rust)

    def __getstate__(self):
        return {'max_seq_len': self.max_seq_len, 'truncate': self.truncate, 'eos_id': self.eos_id,
                '_json': self._json}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup()

    def encode(self, texts: list[str]) -> list:
        """Token ids per text (eos last; at most max_seq_len unless whole documents are asked
        for, where a document longer than PIECE_CHARS is tokenized piece by piece: see
        :func:`document_pieces`)."""
        if self._cut_chars is not None:
            texts = cut_texts(texts, self._cut_chars)
        elif any(len(t) > PIECE_CHARS for t in texts):
            return [self._encode_long(t) if len(t) > PIECE_CHARS else ids for t, ids in
                    zip(texts, self.encode([t if len(t) <= PIECE_CHARS else '' for t in texts]))]
        return [e.ids for e in self._rust.encode_batch_fast(texts, add_special_tokens=True)]

    def _encode_long(self, text: str) -> np.ndarray:
        """A long document's ids (int64, eos last), a piece at a time: the tokenizer's own
        records of one 15 MB line took 1.6 GB at once."""
        pieces, parts = document_pieces(text), []
        for i in range(0, len(pieces), PIECES_AT_ONCE):  # the tokenizer's records of a few pieces at a time
            parts += [np.asarray(e.ids, dtype=np.int64) for e in
                      self._rust.encode_batch_fast(pieces[i:i + PIECES_AT_ONCE], add_special_tokens=False)]
        return np.concatenate(parts + [np.array([self.eos_id], dtype=np.int64)])

    def encode_lengths(self, texts: list[str]) -> np.ndarray:
        """The number of ids of each text (int64), the ids themselves not kept (a counting pass)."""
        return np.fromiter(map(len, self.encode(texts)), dtype=np.int64, count=len(texts))

    def encode_ragged(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All ids concatenated (int64) and the length of each text's part."""
        seqs = self.encode(texts)
        lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        if any(isinstance(s, np.ndarray) for s in seqs):  # a long document's, in one array already
            flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if seqs else np.zeros(0, np.int64)
        else:
            flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lens.sum()))
        return flat, lens


PIECE_CHARS = 1 << 16  # a whole document longer than this is tokenized in pieces of about this many characters
SEAM_CHARS = 4096  # how far back from a piece's end a seam is looked for
PIECES_AT_ONCE = 4  # pieces tokenized in one call (the tokenizer's threads), their records freed after it


def document_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """text in pieces of at most ``size`` characters whose ids, concatenated, are the text's:
    each seam is put before a space within SEAM_CHARS of the end (the tokenizer splits words at
    spaces, '▁', and a piece that starts with one gets no second). A stretch without one (Chinese
    is written without spaces) is cut where it must be: there the tokenizer's '▁' that starts a
    text starts the piece too, and its ids differ from the whole text's by a token or two a seam,
    one seam per PIECE_CHARS characters (tests/test_span_stream.py)."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        space = text.rfind(' ', end - SEAM_CHARS, end)
        end = space if space > start else end
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


# --------------------------------------------------------------------------- batches


def _pad(flat: np.ndarray, lens: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest row; returns (ids [b, L] int64, mask [b, L] int64)."""
    mask = np.arange(int(lens.max())) < lens[:, None]
    ids = np.full(mask.shape, pad, dtype=np.int64)
    ids[mask] = flat  # the mask's row-major order is the order of the concatenated rows
    return ids, mask.astype(np.int64)


def make_batches(parts: list[tuple[list, list, np.ndarray | None, int]], encoder: TokenEncoder) -> list[dict]:
    """Batch dicts (numpy arrays; see :func:`to_torch`) of several local batches, each given
    as (prompts, responses, row_index, num_skipped), tokenized in one call: the tokenizer's
    threads pay off only on a few hundred texts."""
    texts = [t for prompts, responses, _, _ in parts for t in itertools.chain(prompts, responses)]
    flat, lens = encoder.encode_ragged(texts) if texts else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    ends = np.concatenate([[0], np.cumsum(lens)])
    out, row = [], 0
    for prompts, responses, row_index, num_skipped in parts:
        n = len(prompts)
        p = flat[ends[row]:ends[row + n]], lens[row:row + n]
        r = flat[ends[row + n]:ends[row + 2 * n]], lens[row + n:row + 2 * n]
        out.append(batch_from_ids(p, r, row_index, num_skipped, encoder.eos_id))
        row += 2 * n
    return out


def placeholder_batch(eos_id: int) -> dict:
    """One row (input [eos]) whose labels are all padding: a forward that adds no loss, so that a
    rank with nothing left to read still joins its batch's collectives."""
    one = np.ones((1, 1), dtype=np.int64)
    return {'input_ids': one * eos_id, 'attention_mask': one, 'labels': one * LABEL_PAD_ID}


def batch_from_ids(prompts: tuple[np.ndarray, np.ndarray], responses: tuple[np.ndarray, np.ndarray],
                   row_index: np.ndarray | None, num_skipped: int, eos_id: int) -> dict:
    """One padded batch of token ids, each side given as (all ids concatenated, length of each
    row). A batch whose rows were all skipped becomes a 1-row placeholder (input [eos], labels
    -100) so that ranks stay in lockstep; it contributes no target tokens."""
    n = len(prompts[1])
    if n == 0:
        batch = placeholder_batch(eos_id)
    else:
        input_ids, attention = _pad(*prompts, PAD_ID)
        labels, _ = _pad(*responses, LABEL_PAD_ID)
        batch = {'input_ids': input_ids, 'attention_mask': attention, 'labels': labels}
    batch.update(num_rows=n, num_skipped=num_skipped)
    if row_index is not None:
        batch['row_index'] = np.ascontiguousarray(row_index, dtype=np.int64)
    return batch


def to_torch(batch: dict, pin_memory: bool = False) -> dict:
    """numpy arrays -> tensors (zero-copy), optionally pinned for non_blocking copies."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
            if pin_memory:
                v = v.pin_memory()
        out[k] = v
    return out
