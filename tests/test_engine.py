"""End-to-end engine behaviour through the offline LLM API, on random models."""

from __future__ import annotations

import random

import pytest

from shardline.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def mixed_prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(1, 60))]} for _ in range(n)]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), num_kv_blocks=256, block_size=4, max_model_len=256)


def test_greedy_is_batch_invariant(llm, model_dir):
    prompts = mixed_prompts(32)
    alone = [token_ids(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts[:6]]
    batched = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert batched[:6] == alone
    # chunked prefill: a tiny token budget splits every prompt over many steps
    chunked = LLM(str(model_dir), num_kv_blocks=256, block_size=4, max_model_len=256, max_num_batched_tokens=16)
    assert token_ids(chunked.generate(prompts, GREEDY, use_tqdm=False)) == batched
    # preemption: a cache far too small for 32 requests forces recompute
    tiny = LLM(str(model_dir), num_kv_blocks=24, block_size=4, max_model_len=256)
    assert token_ids(tiny.generate(prompts, GREEDY, use_tqdm=False)) == batched
    assert tiny.engine.scheduler.kv.pool.num_free_blocks == 24


def test_preemption_actually_happens(model_dir):
    tiny = LLM(str(model_dir), num_kv_blocks=24, block_size=4, max_model_len=256)
    seen = []
    original = tiny.engine.scheduler.schedule

    def schedule():
        out = original()
        seen.extend(out.preempted_ids)
        return out

    tiny.engine.scheduler.schedule = schedule
    tiny.generate(mixed_prompts(16), GREEDY, use_tqdm=False)
    assert seen, "the tiny cache should have forced at least one preemption"


def test_prefix_cache_hits_are_reported_and_do_not_change_tokens(llm):
    shared = list(range(100, 150))
    prompts = [{"prompt_token_ids": shared + [i + 3]} for i in range(4)]
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 or first.num_cached_tokens < 48
    again = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 48  # 12 full blocks of 4 tokens, last token recomputed
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    others = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert all(o.num_cached_tokens == 48 for o in others)


def test_seeded_sampling_reproduces_across_batches(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    target = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    noise = mixed_prompts(12, seed=3)
    noisy_params = [SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True)] * 12
    batch = llm.generate(noise[:5] + [target] + noise[5:], noisy_params[:5] + [params] + noisy_params[5:], use_tqdm=False)
    assert batch[5].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=12, ignore_eos=True)
    assert llm.generate([target], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_max_tokens_and_stop_token_ids(llm):
    out = llm.generate([{"prompt_token_ids": [10, 11, 12]}], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
    stop_id = out.token_ids[3]
    first = out.token_ids.index(stop_id)
    stopped = llm.generate(
        [{"prompt_token_ids": [10, 11, 12]}],
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0].outputs[0]
    assert stopped.token_ids == out.token_ids[: first + 1]  # the stop token is kept
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id


def test_stop_strings_are_cut_from_text(llm):
    prompt = "The quick brown fox"
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text = free.outputs[0].text
    assert len(text) >= 6
    stop = text[3:6]
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]), use_tqdm=False)[0]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert cut.outputs[0].text == text[: text.index(stop)]
    kept = llm.generate(
        [prompt],
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0]
    assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]


def test_n_returns_distinct_samples_sharing_the_prompt(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    [out] = llm.generate([{"prompt_token_ids": list(range(20, 60))}], params, use_tqdm=False)
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert all(len(o.token_ids) == 8 for o in out.outputs)
    [again] = llm.generate([{"prompt_token_ids": list(range(20, 60))}], params, use_tqdm=False)
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_logprobs_are_top_n_plus_chosen(llm):
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    total = 0.0
    for token_id, position in zip(out.token_ids, out.logprobs):
        assert token_id in position
        assert position[token_id].rank == 1  # greedy picks the most likely token
        ranks = sorted(lp.rank for lp in position.values())
        assert ranks == [1, 2, 3]
        values = [lp.logprob for lp in sorted(position.values(), key=lambda lp: lp.rank)]
        assert values == sorted(values, reverse=True) and values[0] <= 0.0
        total += position[token_id].logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_penalties_change_the_distribution(llm):
    prompt = [{"prompt_token_ids": [7, 7, 7, 8, 9]}]
    base = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    rep = llm.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0), use_tqdm=False
    )
    base_ids, rep_ids = base[0].outputs[0].token_ids, rep[0].outputs[0].token_ids
    assert len(set(rep_ids)) >= len(set(base_ids))
    biased = llm.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logit_bias={42: 100.0}), use_tqdm=False
    )
    assert biased[0].outputs[0].token_ids == [42, 42, 42, 42]


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ({"prompt_token_ids": []}, GREEDY, "empty"),
        ("", GREEDY, "empty"),
        ({"prompt_token_ids": [1, 512]}, GREEDY, "outside the vocabulary"),
        ({"prompt_token_ids": [1, -1]}, GREEDY, "outside the vocabulary"),
        ({"prompt_token_ids": [1] * 256}, GREEDY, "context"),
        ({"prompt_token_ids": [1, 2]}, SamplingParams(n=99), "exceeds the limit"),
        ({"prompt_token_ids": [1, 2]}, SamplingParams(stop_token_ids=[10_000]), "outside the vocabulary"),
    ],
)
def test_bad_requests_are_refused_and_harm_nothing(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([{"prompt_token_ids": [3, 4]}, prompt], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([{"prompt_token_ids": [3, 4]}], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_prompt_larger_than_the_whole_cache_is_refused(model_dir):
    small = LLM(str(model_dir), num_kv_blocks=4, block_size=4, max_model_len=256)
    with pytest.raises(ValueError, match="whole cache"):
        small.generate([{"prompt_token_ids": list(range(3, 40))}], GREEDY, use_tqdm=False)


def test_bad_sampling_params_are_refused():
    for kwargs in [dict(temperature=-1), dict(top_p=0), dict(top_k=-5), dict(n=0), dict(max_tokens=0), dict(logprobs=-1)]:
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


def test_chat_and_text_prompts(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "Hello"}]
    assert tok.apply_chat_template(messages) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    [out] = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
    assert out.prompt_token_ids == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    # a random model may end inside a multi-byte character: those bytes are held back
    full = tok.decode(out.outputs[0].token_ids)
    assert full.startswith(out.outputs[0].text) and set(full[len(out.outputs[0].text) :]) <= {"\ufffd"}


def test_detokenizer_keeps_multibyte_characters_whole(llm):
    tok = llm.get_tokenizer()
    text = "Café naïve — 日本語 🙂 done"
    ids = tok.encode(text)
    detok = tok.new_detokenizer([], skip_special_tokens=True)
    pieces = [detok.step(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_warm_up_leaves_no_trace(model_dir):
    """A server's warm-up request runs a step but leaves no request, cache entry or KV event behind."""
    from shardline.engine.llm_engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=16, block_size=16))
    free = engine.stats()["num_free_blocks"]
    engine.warm_up()
    assert not engine.has_unfinished_requests()
    assert engine.cached_block_hashes() == [] and engine.take_kv_events() == []
    assert engine.stats()["num_free_blocks"] == free
    with pytest.raises(RuntimeError, match="before any request"):
        engine.add_request("r", {"prompt_token_ids": [1, 2, 3]})
        engine.warm_up()


class PassRecorder:
    """A step's outputs as they come: every request's tokens so far, and the
    (request, tokens so far) of each early pass handed to on_first_tokens."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.early: list[list[tuple[str, int]]] = []

    def keep(self, outputs) -> None:
        for out in outputs:
            self.tokens[out.request_id] = list(out.outputs[0].token_ids)

    def first_pass(self, outputs) -> None:
        self.early.append([(o.request_id, len(o.outputs[0].token_ids)) for o in outputs])
        self.keep(outputs)


def run_in_passes(model_dir, prompts, pass_tokens: int, **config):
    """Run `prompts` to the end, their first step with on_first_tokens: every request's tokens, the early
    passes' (request, tokens) lists, and what the first step itself returned."""
    from shardline.engine import EngineConfig, LLMEngine

    engine = LLMEngine(
        EngineConfig(model=str(model_dir), num_kv_blocks=256, block_size=4, max_model_len=256,
                     first_token_pass_tokens=pass_tokens, **config)
    )  # fmt: skip
    rec = PassRecorder()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    last = engine.step(on_first_tokens=rec.first_pass)
    rec.keep(last)
    returned = [(o.request_id, len(o.outputs[0].token_ids)) for o in last]
    while engine.has_unfinished_requests():
        rec.keep(engine.step(on_first_tokens=rec.first_pass))
    return rec.tokens, rec.early, returned


def test_a_mixed_step_runs_its_prefills_first_with_the_same_tokens(model_dir):
    """With on_first_tokens, a step of prefills beside decodes hands the new requests' first tokens
    over after the prefill pass, before the decodes run; every token equals the one-pass step's."""
    from shardline.engine import EngineConfig, LLMEngine

    def run(split: bool) -> tuple[dict[str, list[int]], list[list[tuple[str, int]]], bool]:
        engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=256, block_size=4, max_model_len=256))
        prompts = mixed_prompts(6, seed=3)
        rec = PassRecorder()

        def step() -> None:
            rec.keep(engine.step(on_first_tokens=rec.first_pass if split else None))

        for i, p in enumerate(prompts[:3]):
            engine.add_request(str(i), p, GREEDY)
        step()  # three prefills, nothing decoding yet: one pass
        step()
        for i, p in enumerate(prompts[3:], start=3):
            engine.add_request(str(i), p, GREEDY)  # they arrive while 0-2 decode: a mixed step
        step()
        while engine.has_unfinished_requests():
            step()
        return rec.tokens, rec.early, engine.runner.fused_decode_available

    one_pass, none, _ = run(split=False)
    two_pass, early, native = run(split=True)
    assert two_pass == one_pass and none == []
    assert all(len(t) == GREEDY.max_tokens for t in one_pass.values())
    if native:
        assert early == [[("3", 1), ("4", 1), ("5", 1)]]  # only the new requests, with their first token
    else:
        assert early == []  # without the whole-stack kernel a mixed step stays one pass


def test_prefills_run_in_groups_each_handing_out_its_first_tokens(model_dir):
    """With first_token_pass_tokens, a step's new prompts run in groups of about that many tokens;
    each group's requests get their first token when their pass ends, and every token equals the
    one-pass step's."""
    rng = random.Random(7)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(30)]} for _ in range(4)]

    def run(pass_tokens: int):
        return run_in_passes(model_dir, prompts, pass_tokens)  # four 30-token prompts, one step

    whole, none, all_four = run(0)
    assert none == [] and sorted(all_four) == [(str(i), 1) for i in range(4)]
    grouped, early, last = run(40)  # 30 + 30 > 40: each prompt is a group of its own
    assert grouped == whole
    assert all(len(t) == GREEDY.max_tokens for t in whole.values())
    assert early[:3] == [[("0", 1)], [("1", 1)], [("2", 1)]] and last == [("3", 1)]
    pair, early2, last2 = run(60)  # two prompts a pass
    assert pair == whole and early2[0] == [("0", 1), ("1", 1)] and last2 == [("2", 1), ("3", 1)]


def test_a_short_chunk_that_samples_nothing_rides_in_the_group_before_it(model_dir):
    """The step's budget ends inside a prompt: that chunk hands out no token, so it runs in the last
    group's pass instead of a pass of its own; the tokens are those of the one-pass step."""
    rng = random.Random(11)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(30)]} for _ in range(5)]

    def run(pass_tokens: int):  # the first step: 4 whole prompts and 20 tokens of the fifth
        return run_in_passes(model_dir, prompts, pass_tokens, max_num_batched_tokens=140)

    whole, _, _ = run(0)
    grouped, early, last = run(60)
    assert grouped == whole
    assert early[0] == [("0", 1), ("1", 1)] and last == [("2", 1), ("3", 1)]  # two passes, not three
    assert [] not in early  # no pass ran only the unfinished chunk
