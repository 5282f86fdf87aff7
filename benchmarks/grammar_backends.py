"""Which grammar engine masks tokens faster on this CPU: llguidance or xgrammar.

    .venv/bin/python benchmarks/grammar_backends.py [--repeats 5]

Both libraries are made for constrained decoding; shardline uses one of them for
`response_format` and tool calls. Each gets SmolLM2-135M's tokenizer (49152
tokens) and the same JSON schemas, and walks the same token sequence of a valid
instance of each schema: at every step it computes the next-token bitmask, then
accepts the token. Timed per schema: the compile (tokenizer set up once, outside),
and every step's mask. The last line is one JSON object; `mask_us_ratio` is
xgrammar's median mask time over llguidance's (above 1: llguidance is faster).
xgrammar is the peer here, not a dependency: `.venv/bin/pip install xgrammar` first
(it brings transformers and triton).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: never shadows an installed package

from benchmarks.models import model_folder  # noqa: E402
from tests.structured_schemas import SCHEMA_INSTANCES  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_llguidance(tokenizer_json: str, vocab: int, eos: int, cases, repeats: int) -> dict:
    import llguidance as llg
    import numpy as np
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    started = time.perf_counter()
    tok = llg.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
    setup_s = time.perf_counter() - started
    bitmask = allocate_token_bitmask(1, vocab)
    compile_s, mask_s = [], []
    for schema, ids in cases:
        for _ in range(repeats):
            started = time.perf_counter()
            matcher = llg.LLMatcher(tok, llg.LLMatcher.grammar_from_json_schema(schema))
            compile_s.append(time.perf_counter() - started)
            assert not matcher.is_error(), matcher.get_error()
            for t in ids:
                started = time.perf_counter()
                fill_next_token_bitmask(matcher, bitmask)
                mask_s.append(time.perf_counter() - started)
                assert (bitmask[0, t // 32] >> np.int32(t % 32)) & 1, "llguidance masked the instance's own token"
                assert matcher.consume_token(t), matcher.get_error()
            assert matcher.is_accepting()
    return {"setup_s": setup_s, "compile_s": compile_s, "mask_s": mask_s}


def run_xgrammar(folder: Path, vocab: int, eos: int, cases, repeats: int) -> dict:
    try:
        import xgrammar as xgr
    except ImportError:
        raise SystemExit("grammar_backends: xgrammar is not installed: .venv/bin/pip install xgrammar") from None
    from transformers import PreTrainedTokenizerFast

    started = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    setup_s = time.perf_counter() - started
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    compile_s, mask_s = [], []
    for schema, ids in cases:
        for _ in range(repeats):
            started = time.perf_counter()
            matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
            compile_s.append(time.perf_counter() - started)
            for t in ids:
                started = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask)
                mask_s.append(time.perf_counter() - started)
                assert (int(bitmask[0, t // 32]) >> (t % 32)) & 1, "xgrammar masked the instance's own token"
                assert matcher.accept_token(t)
            assert matcher.is_terminated() or matcher.accept_token(eos)
    return {"setup_s": setup_s, "compile_s": compile_s, "mask_s": mask_s}


def summarize(raw: dict) -> dict:
    return {
        "setup_s": round(raw["setup_s"], 3),
        "compile_ms_p50": round(statistics.median(raw["compile_s"]) * 1e3, 3),
        "compile_ms_p99": round(percentile(raw["compile_s"], 0.99) * 1e3, 3),
        "mask_us_p50": round(statistics.median(raw["mask_s"]) * 1e6, 1),
        "mask_us_p99": round(percentile(raw["mask_s"], 0.99) * 1e6, 1),
        "mask_us_mean": round(statistics.fmean(raw["mask_s"]) * 1e6, 1),
        "steps": len(raw["mask_s"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="walks of each schema per backend")
    args = p.parse_args(argv)
    from tokenizers import Tokenizer

    folder = model_folder("smollm2-135m", "bf16")
    tokenizer_json = (folder / "tokenizer.json").read_text()
    config = json.loads((folder / "config.json").read_text())
    vocab, eos = config["vocab_size"], config.get("eos_token_id", 2)
    eos = eos[0] if isinstance(eos, list) else eos
    tok = Tokenizer.from_str(tokenizer_json)
    cases = [(schema, tok.encode(json.dumps(instance), add_special_tokens=False).ids) for schema, instance in SCHEMA_INSTANCES]
    results = {
        "llguidance": summarize(run_llguidance(tokenizer_json, vocab, eos, cases, args.repeats)),
        "xgrammar": summarize(run_xgrammar(folder, vocab, eos, cases, args.repeats)),
    }
    for name, r in results.items():
        print(
            f"{name:10s} mask p50 {r['mask_us_p50']:8.1f} us  p99 {r['mask_us_p99']:8.1f} us  "
            f"compile p50 {r['compile_ms_p50']:8.2f} ms  p99 {r['compile_ms_p99']:8.2f} ms  set-up {r['setup_s']:.2f} s",
            file=sys.stderr,
        )
    ratio = results["xgrammar"]["mask_us_p50"] / results["llguidance"]["mask_us_p50"]
    print(json.dumps({"bench": "grammar_backends", "schemas": len(cases), **results, "mask_us_ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
