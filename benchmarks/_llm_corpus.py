"""The offline text corpus and the small dense LM of ``llm_quality.py``.

Corpus: the English reStructuredText sources of the Python documentation, which the Debian package
``python3.11-doc`` installs under ``/usr/share/doc/python3.11/html/_sources`` (``apt-get install python3.11-doc``;
~11 MB, 497 files). Files are split deterministically by the CRC32 of their path: 1 in 20 held out for the test
perplexity, 1 in 20 for calibration / distillation data, the rest for training the dense model. Tokens are bytes
(vocabulary 256): no tokenizer to train or download.

Model: a Llama-architecture causal LM with grouped-query attention (hidden 192, 4 layers, 6 query heads over 2
kv heads of 32 dims, MLP 512, untied embeddings, ~1.7 M parameters), trained once with AdamW and cached under ``benchmarks/.cache`` (keyed
by its settings); later runs load it.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
DOC_DIRS = [Path("/usr/share/doc/python3.11/html/_sources"), Path("/usr/share/doc/python3-doc/html/_sources")]
CONFIG = dict(vocab_size=256, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
TRAIN = dict(steps=2000, batch=16, seq=128, lr=3e-3, warmup=100, weight_decay=0.1, seed=0)


def corpus_dir() -> Path:
    for d in DOC_DIRS:
        if d.is_dir() and any(d.rglob("*.rst.txt")):
            return d
    raise FileNotFoundError("the Python documentation sources are not installed: apt-get install python3.11-doc "
                            f"(looked in {', '.join(map(str, DOC_DIRS))})")


def splits() -> dict[str, bytes]:
    """{"train", "calib", "test"}: the concatenated bytes of each split's files (sorted by path)."""
    root = corpus_dir()
    parts: dict[str, list[bytes]] = {"train": [], "calib": [], "test": []}
    for p in sorted(root.rglob("*.rst.txt")):
        h = zlib.crc32(str(p.relative_to(root)).encode()) % 20
        parts["test" if h == 0 else "calib" if h == 1 else "train"].append(p.read_bytes())
    return {k: b"\n".join(v) for k, v in parts.items()}


def to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(tokens: torch.Tensor, seq: int, n: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Non-overlapping (or ``stride``-spaced) windows of ``seq`` tokens, at most ``n`` of them."""
    stride = stride or seq
    starts = range(0, len(tokens) - seq, stride)
    if n is not None:
        step = max(1, len(starts) // n)
        starts = list(starts)[::step][:n]
    return torch.stack([tokens[s:s + seq] for s in starts])


def build_model(config: dict | None = None):
    import transformers
    cfg = transformers.LlamaConfig(**(config or CONFIG))
    return transformers.LlamaForCausalLM(cfg)


def _key() -> str:
    return hashlib.sha1(json.dumps([CONFIG, TRAIN], sort_keys=True).encode()).hexdigest()[:10]


@torch.no_grad()
def perplexity(model, batches: torch.Tensor, bs: int = 16) -> float:
    """exp(mean next-token cross-entropy) over every window of ``batches`` (N, L)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(batches), bs):
        ids = batches[i:i + bs]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def dense_model(log=print):
    """The trained dense model (trained now and cached when missing) and its training record."""
    path = CACHE / f"dense_{_key()}.pt"
    model = build_model()
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state"])
        return model.eval(), blob["info"]
    data = splits()
    train = to_tensor(data["train"])
    val = windows(to_tensor(data["calib"]), TRAIN["seq"], 64)
    g = torch.Generator().manual_seed(TRAIN["seed"])
    torch.manual_seed(TRAIN["seed"])
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.95), weight_decay=TRAIN["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / TRAIN["warmup"]) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / TRAIN["steps"]))))
    t0 = time.perf_counter()
    model.train()
    for step in range(TRAIN["steps"]):
        idx = torch.randint(0, len(train) - TRAIN["seq"] - 1, (TRAIN["batch"],), generator=g)
        ids = torch.stack([train[i:i + TRAIN["seq"]] for i in idx.tolist()])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == TRAIN["steps"] - 1:
            log(f"dense training step {step}/{TRAIN['steps']}: loss {float(loss):.3f}, "
                f"val ppl {perplexity(model, val):.3f}, {time.perf_counter() - t0:.0f} s")
            model.train()
    info = {"train_s": round(time.perf_counter() - t0, 1), "params": sum(p.numel() for p in model.parameters()),
            "config": CONFIG, "train": TRAIN, "train_bytes": len(train)}
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": model.state_dict(), "info": info}, tmp)
    tmp.replace(path)
    return model.eval(), info


if __name__ == "__main__":
    m, info = dense_model()
    print(info)
