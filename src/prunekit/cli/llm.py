"""``prunekit prune hf:DIR --calib FILE.txt [--calib-samples N --seq-len L] [--depth K]``: calibration text for LLMs.

The calibration file is read as UTF-8 text and tokenized with the model directory's own tokenizer when it has
one (``AutoTokenizer.from_pretrained(DIR, local_files_only=True)``), else byte by byte (``id = byte % vocab``).
The token stream is cut into non-overlapping windows of ``--seq-len`` tokens; the last tenth of them (at least
one, when there are two or more) is held out for the perplexity before/after in the report, and up to
``--calib-samples`` of the others, evenly spaced, are the calibration batches of the data criteria, of
``--bias-compensation`` and of ``--depth`` (block influence).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .common import FAILURE, CLIError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
BATCH_ROWS = 8  # windows per calibration batch


@dataclass
class Calibration:
    path: str
    tokenizer: str  # "byte-level" or "AutoTokenizer(DIR)"
    n_tokens: int
    seq_len: int
    batches: list  # [{"input_ids": (b, L)}]
    held_out: Any  # (n, L) tensor or None
    n_samples: int = 0
    notes: list[str] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        return {"file": self.path, "tokenizer": self.tokenizer, "tokens": self.n_tokens, "seq_len": self.seq_len,
                "samples": self.n_samples, "batches": len(self.batches),
                "held_out_windows": 0 if self.held_out is None else int(self.held_out.shape[0]), "notes": self.notes}


def _tokenize(text: str, model_spec: str, vocab: int) -> tuple[list[int], str]:
    kind, _, rest = model_spec.partition(":")
    d = Path(rest) if kind == "hf" else None
    if d is not None and d.is_dir() and any((d / f).is_file() for f in TOKENIZER_FILES):
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except Exception as e:
            raise CLIError(f"--calib: could not load the tokenizer of {d}: {type(e).__name__}: {e}", FAILURE) from e
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise CLIError(f"--calib: the tokenizer of {d} gives ids up to {max(bad)} but the model's vocab_size is "
                           f"{vocab}", FAILURE)
        return ids, f"AutoTokenizer({d})"
    return [b % vocab for b in text.encode("utf-8")], "byte-level"


def load_calibration(path: str, model_spec: str, vocab: int, samples: int, seq_len: int) -> Calibration:
    import torch
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--calib: no such file {path!r}", FAILURE)
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CLIError(f"--calib: {path} is empty", FAILURE)
    ids, how = _tokenize(text, model_spec, vocab)
    n_win = len(ids) // seq_len
    if n_win < 1:
        raise CLIError(f"--seq-len {seq_len} is larger than the calibration text ({len(ids)} tokens, {how}); "
                       "use a smaller --seq-len or a longer --calib file", FAILURE)
    wins = torch.tensor(ids[:n_win * seq_len], dtype=torch.long).view(n_win, seq_len)
    notes = []
    if n_win >= 2:
        n_hold = max(1, n_win // 10)
        held, calib = wins[n_win - n_hold:], wins[:n_win - n_hold]
    else:
        held, calib = None, wins
        notes.append("the text holds one window of --seq-len tokens: no held-out perplexity")
    if len(calib) > samples:
        step = len(calib) / samples
        calib = calib[[int(i * step) for i in range(samples)]]
    elif len(calib) < samples:
        notes.append(f"only {len(calib)} calibration windows of {seq_len} tokens (asked for {samples})")
    batches = [{"input_ids": b} for b in calib.split(BATCH_ROWS)]
    return Calibration(str(p), how, len(ids), seq_len, batches, held, len(calib), notes)


class ProgressData:
    """Re-iterable batches that draw a progress bar (runs.progress.progress_bar) on every pass."""

    def __init__(self, batches: list, desc: str, enabled: bool):
        self.batches, self.desc, self.enabled = batches, desc, enabled

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        from ..runs.progress import progress_bar
        with progress_bar(self.enabled, len(self.batches), 0, self.desc) as advance:
            for i, b in enumerate(self.batches):
                yield b
                advance(f"{i + 1}/{len(self.batches)}")


def bars_enabled(args) -> bool:
    return not (args.quiet or args.json) and sys.stderr.isatty()
