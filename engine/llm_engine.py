"""The synchronous engine: validate and queue requests, step, and emit outputs.

One step reads as schedule -> execute -> update_from_output; the output side
then detokenizes, applies stop strings and assembles RequestOutputs. Parallel
sampling (n > 1) fans a request out into n sequences sharing the prompt's
cached blocks. The busy loop lives in the callers (LLM, AsyncLLMEngine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from shardline.engine.config import ModelConfig
from shardline.engine.distributed import (
    LocalProcessLauncher,
    TensorParallelGroup,
    WorkerLauncher,
    WorkerSpec,
    default_num_threads,
    make_init_method,
)
from shardline.engine.tensor_parallel import shard_heads
from shardline.engine.kv_cache import KVCacheManager, KVEvent
from shardline.engine.model_runner import ModelRunner
from shardline.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from shardline.engine.request import Request, RequestStatus
from shardline.engine.sampling_params import SamplingParams
from shardline.engine.scheduler import ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput
from shardline.engine.structured_output import GrammarCompiler
from shardline.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from shardline.engine.weights import build_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A prompt: text, or {"prompt_token_ids": [...]} (optionally with "prompt").
PromptType = str | dict[str, Any]


@dataclass
class EngineConfig:
    """Everything that shapes one engine instance.

    Args:
        model: a Hugging Face model folder or a pulled alias (see `shardline pull`).
        dtype: weights and KV cache dtype, "float32" or "bfloat16".
        max_model_len: context length (prompt plus output); default: the model's.
        num_kv_blocks: KV cache size in blocks; default from kv_cache_memory_gb.
        kv_cache_memory_gb: KV cache budget when num_kv_blocks is not given.
        max_n: the largest `n` a request may ask for.
        first_token_pass_tokens: in the async engine, a step's prefill chunks run
            in passes of about this many tokens (whole requests; 0: one pass), each
            handing its new requests their first tokens as it ends.
    """

    model: str
    dtype: str = "float32"
    max_model_len: int | None = None
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 2.0
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int | None = 0
    max_n: int = 16
    first_token_pass_tokens: int = 512
    skip_tokenizer_init: bool = False
    # Ranks the model is split over (rank 0 in this process, the others started by a launcher).
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.first_token_pass_tokens < 0:
            raise ValueError(f"first_token_pass_tokens must be >= 0, got {self.first_token_pass_tokens}")


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
    """Bytes of K and V for one block across all layers."""
    heads = num_kv_heads or config.num_kv_heads
    return 2 * config.num_layers * block_size * heads * config.head_dim * dtype.itemsize


@dataclass
class _Sequence:
    """Output-side state of one of a request's n sequences."""

    index: int
    request: Request
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _RequestState:
    """Output-side state of one user request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    arrival_time: float
    first_token_time: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class LLMEngine:
    """A single-replica engine: paged KV cache, continuous batching, prefix caching.

    Args:
        config: the engine's shape and budgets.
        launcher: starts the worker ranks when config.tensor_parallel_size > 1
            (default: local processes; the cluster passes one that uses Ray actors).
    """

    def __init__(self, config: EngineConfig, launcher: WorkerLauncher | None = None):
        self.config = config
        folder = Path(config.model)
        self.model_config = ModelConfig.from_folder(folder)
        mc = self.model_config
        limit = mc.max_position_embeddings
        if mc.sliding_window:
            limit = min(limit, mc.sliding_window)
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context of {limit} tokens")
        self.max_model_len = config.max_model_len or limit
        dtype = DTYPES[config.dtype]
        tp = config.tensor_parallel_size
        self.tp_group: TensorParallelGroup | None = None
        self._saved_num_threads: int | None = None
        if tp > 1:
            # Every rank gets the same number of blocks, sized for the rank with the most KV heads.
            kv_heads = max(len(shard_heads(mc.num_heads, mc.num_kv_heads, r, tp).kv_heads) for r in range(tp))
            num_blocks = self._num_kv_blocks(dtype, kv_heads)
            launcher = launcher or LocalProcessLauncher()
            spec = WorkerSpec(
                folder=str(folder),
                dtype=config.dtype,
                max_positions=self.max_model_len,
                num_blocks=num_blocks,
                block_size=config.block_size,
                world_size=tp,
                init_method=make_init_method(launcher.rendezvous_host()),
            )
            if isinstance(launcher, LocalProcessLauncher):
                # Every rank shares this machine's cores: don't oversubscribe them.
                spec.num_threads = default_num_threads(tp)
                self._saved_num_threads = torch.get_num_threads()
                torch.set_num_threads(spec.num_threads)
            self.tp_group = TensorParallelGroup(spec, launcher)
            model = self.tp_group.build_model()
        else:
            model = build_model(folder, dtype, max_positions=self.max_model_len)
            num_blocks = self._num_kv_blocks(dtype, mc.num_kv_heads)
        self.tokenizer = None
        if not config.skip_tokenizer_init and (folder / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer(folder)
        self.eos_token_ids = frozenset(mc.eos_token_ids or ([self.tokenizer.eos_token_id] if self.tokenizer and self.tokenizer.eos_token_id is not None else []))

        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_batched_tokens=config.max_num_batched_tokens or max(2048, config.max_num_seqs),
                max_num_seqs=config.max_num_seqs,
                max_model_len=self.max_model_len,
                enable_chunked_prefill=config.enable_chunked_prefill,
            ),
            KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching),
        )
        self.runner = ModelRunner(model, num_blocks, config.block_size, dtype, config.seed, self.tp_group)
        self._grammars: GrammarCompiler | None = None
        self._states: dict[str, _RequestState] = {}
        self._seq_of: dict[str, tuple[_RequestState, _Sequence]] = {}

    def _num_kv_blocks(self, dtype: torch.dtype, num_kv_heads: int) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = kv_bytes_per_block(self.model_config, cfg.block_size, dtype, num_kv_heads)
        budget = int(cfg.kv_cache_memory_gb * (1 << 30)) // per_block
        # Never more than every sequence at full length could use.
        ceiling = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)
        return max(1, min(budget, ceiling))

    def healthy(self) -> bool:
        """False when a tensor-parallel shard is gone: the engine cannot run steps any more."""
        return self.tp_group is None or self.tp_group.healthy()

    def shutdown(self) -> None:
        """Stop the worker ranks, if any (the engine is unusable afterwards)."""
        if self.tp_group is not None:
            self.tp_group.close()
        if self._saved_num_threads is not None:
            torch.set_num_threads(self._saved_num_threads)
            self._saved_num_threads = None

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def num_kv_blocks(self) -> int:
        return self.scheduler.kv.num_blocks

    # ---- requests ----------------------------------------------------------

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt; raises ValueError on a malformed one."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: send {'prompt_token_ids': [...]} instead of text")
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        raise ValueError("a prompt is a string or a dict with 'prompt_token_ids'")

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError when this request could never run as asked."""
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        vocab = self.vocab_size
        bad = [t for t in list(prompt_token_ids) + params.token_ids_in_use() if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.n > self.config.max_n:
            raise ValueError(f"n={params.n} exceeds the limit of {self.config.max_n}")
        reason = self.scheduler.check_fits(len(prompt_token_ids))
        if reason:
            raise ValueError(reason)
        if params.structured_outputs is not None:
            self.grammar_compiler.compile(params.structured_outputs)

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of structured-output grammars for this model's tokenizer (built on first use)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need the model's tokenizer, and this engine has none")
            self._grammars = GrammarCompiler(self.tokenizer.to_json(), self.vocab_size, sorted(self.eos_token_ids))
        return self._grammars

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        cache_salt: str | bytes | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Validate and queue a request; raises ValueError (nothing queued) when it is bad."""
        if request_id in self._states:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        text, ids = self.tokenize_prompt(prompt)
        self.validate(ids, params)
        salt = cache_salt.encode() if isinstance(cache_salt, str) else cache_salt
        max_tokens = self.max_model_len - len(ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        # A grammar ends its output with end-of-sequence, ignore_eos or not.
        keep_eos = not params.ignore_eos or params.structured_outputs is not None
        stop_ids = frozenset(params.stop_token_ids) | (self.eos_token_ids if keep_eos else frozenset())
        now = arrival_time if arrival_time is not None else time.time()
        state = _RequestState(request_id, text, ids, params, [], now)
        for i in range(params.n):
            child_params = params.for_child(i) if params.n > 1 else params
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            req = Request(
                request_id=child_id,
                prompt_token_ids=ids,
                max_tokens=max_tokens,
                stop_token_ids=stop_ids,
                min_tokens=params.min_tokens,
                cache_salt=salt,
                sampling=child_params,
                arrival_time=now,
            )
            if params.structured_outputs is not None:
                req.grammar = self.grammar_compiler.new_state(params.structured_outputs)
            detok = None
            if self.tokenizer is not None:
                detok = self.tokenizer.new_detokenizer(ids, params.skip_special_tokens)
            seq = _Sequence(i, req, detok)
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            state.sequences.append(seq)
        self._states[request_id] = state
        for seq in state.sequences:
            self._seq_of[seq.request.request_id] = (state, seq)
            self.scheduler.add_request(seq.request)

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Stop requests at once and free their KV blocks."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            state = self._states.get(request_id)
            if state is None:
                continue
            self.scheduler.finish_requests(
                [s.request.request_id for s in state.sequences], RequestStatus.FINISHED_ABORTED
            )
        # Aborted requests produce no more output: forget them now.
        for req in self.scheduler.take_finished():
            self._finish_sequence(req)
        for request_id in request_ids:
            state = self._states.get(request_id)
            if state is not None and state.finished:
                self._forget(state)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._states)

    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    def get_num_unfinished_requests(self) -> int:
        return len(self._states)

    # ---- the step ----------------------------------------------------------

    def step(
        self,
        final_only: bool = False,
        on_scheduled: Callable[[], None] | None = None,
        on_first_tokens: Callable[[list[RequestOutput]], None] | None = None,
    ) -> list[RequestOutput]:
        """Run one iteration; return the outputs of every request that progressed.

        With `final_only`, only finished requests get an output (the offline
        API needs nothing else, and building cumulative outputs costs O(tokens)).
        `on_scheduled` runs after the step's batch is chosen and before the
        model runs: the async engine publishes its load there, so a request
        whose long prefill is running counts as running, not waiting.
        With `on_first_tokens`, the step may run as several passes
        (`split_for_first_tokens`): its prefill chunks first, in groups, each
        group's outputs (the new requests' first tokens) going to
        `on_first_tokens` as it ends, then the decodes, whose outputs this returns.
        """
        sched = self.scheduler.schedule()
        if on_scheduled is not None:
            on_scheduled()
        parts = self.split_for_first_tokens(sched) if on_first_tokens is not None else [sched]
        step_start = time.time()
        for part in parts[:-1]:
            on_first_tokens(self._run_part(part, final_only, step_start))
        return self._run_part(parts[-1], final_only, step_start)

    def split_for_first_tokens(self, sched: SchedulerOutput) -> list[SchedulerOutput]:
        """`sched` as passes that hand out first tokens early: prefill groups, then decodes.

        Prefill chunks go in groups of whole requests of about
        `first_token_pass_tokens`: a prefill is compute bound, so a group costs
        its share of the step (the packed matmul streams the weights once per
        256 rows anyway) and its requests' first tokens are out when it ends,
        not when the whole step does. 16 new 128-token prompts, SmolLM2 bf16:
        one pass 1225 ms; passes of 512 tokens 1280 ms in all, the first tokens
        out after 800 ms on average. Served, 64 prompts at once (serve_load,
        three alternating pairs): TTFT p50 3045 / 3054 / 3094 ms against 3294 /
        3427 / 3249 with passes of 1024 and 3627 / 3584 / 3648 with one pass.
        A chunk that ends short of its prompt (the step's budget ran out) hands
        out no token: under half a group, it joins the group before it rather
        than pay for a pass of its own (the 7 / 55 / 91-token tails of a served
        burst ran 20 / 50 / 75 ms alone, at a third of a full pass's rate).
        Decodes run last, as a pass of their own where the whole-stack kernel
        runs them: in the last prefill pass they would hold back its first
        tokens for little gain (SmolLM2 bf16, a 128-token prompt beside 4 / 16
        decodes: one native pass 75.7 / 95.7 ms; two passes 82.1 / 93.4 ms,
        the first token out after 71.9 / 72.7). Without that kernel (tensor
        parallelism) they join the last prefill group's pass.
        """
        prefills = [s for s in sched.scheduled if s.num_new_tokens > 1]
        decodes = [s for s in sched.scheduled if s.num_new_tokens == 1]
        limit = self.config.first_token_pass_tokens
        groups: list[list[ScheduledRequest]] = []
        tokens = 0
        for s in prefills:
            small_tail = not s.sample and 2 * s.num_new_tokens < limit
            if not groups or (limit and tokens + s.num_new_tokens > limit and not small_tail):
                groups.append([])
                tokens = 0
            groups[-1].append(s)
            tokens += s.num_new_tokens
        if decodes:
            if groups and not self.runner.fused_decode_available:
                groups[-1] += decodes
            else:
                groups.append(decodes)
        if len(groups) < 2:
            return [sched]
        parts = [SchedulerOutput(g, sum(s.num_new_tokens for s in g)) for g in groups]
        parts[0].preempted_ids = sched.preempted_ids
        return parts

    def _run_part(self, sched: SchedulerOutput, final_only: bool, step_start: float) -> list[RequestOutput]:
        """Execute one batch of the step begun at `step_start` (possibly empty), apply its tokens, and
        build the outputs it changed."""
        touched: dict[str, _RequestState] = {}
        if not sched.is_empty:
            result = self.runner.execute(sched)
            updated = self.scheduler.update_from_output(sched, result.token_ids)
            now = time.time()
            for req, token_id, logprobs in self._aligned(sched, result, updated):
                state, seq = self._seq_of[req.request_id]
                if state.first_token_time is None:
                    state.first_token_time = now
                    # Start of the step that sampled its first token (queue time ends here).
                    state.metrics["first_scheduled_time"] = step_start
                self._process_token(seq, token_id, logprobs)
                touched[state.request_id] = state
        for req in self.scheduler.take_finished():
            state = self._finish_sequence(req)
            if state is not None:
                touched[state.request_id] = state
        outputs = [self._make_output(state) for state in touched.values() if state.finished or not final_only]
        for state in touched.values():
            if state.finished:
                self._forget(state)
        return outputs

    @staticmethod
    def _aligned(sched, result, updated):
        updated_ids = {id(r) for r in updated}
        for i, s in enumerate(sched.scheduled):
            if id(s.request) in updated_ids:
                yield s.request, result.token_ids[i], result.logprobs[i]

    def _process_token(self, seq: _Sequence, token_id: int, logprobs: PositionLogprobs | None) -> None:
        if logprobs is not None and seq.logprobs is not None:
            if self.tokenizer is not None:
                for tid, lp in logprobs.items():
                    lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token_id].logprob
        if seq.detokenizer is None:
            return
        prev_len = len(seq.text)
        seq.text += seq.detokenizer.step(token_id)
        stop = self._find_stop_string(seq, prev_len)
        if stop is not None and not seq.request.is_finished:
            seq.stop_reason = stop
            self.scheduler.finish_requests([seq.request.request_id], RequestStatus.FINISHED_STOPPED)

    @staticmethod
    def _find_stop_string(seq: _Sequence, prev_len: int) -> str | None:
        """Cut the text at the earliest stop string that the new text completes."""
        params = seq.request.sampling
        best: tuple[int, str] | None = None
        for stop in params.stop:
            idx = seq.text.find(stop, max(0, prev_len - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        seq.text = seq.text[: idx + len(stop)] if params.include_stop_str_in_output else seq.text[:idx]
        return stop

    def _finish_sequence(self, req: Request) -> _RequestState | None:
        entry = self._seq_of.get(req.request_id)
        if entry is None:
            return None
        state, seq = entry
        seq.finish_reason = req.status.finish_reason
        if seq.stop_reason is None:
            seq.stop_reason = req.stop_reason
        return state

    def _forget(self, state: _RequestState) -> None:
        del self._states[state.request_id]
        for seq in state.sequences:
            self._seq_of.pop(seq.request.request_id, None)

    def _make_output(self, state: _RequestState) -> RequestOutput:
        outputs = []
        for seq in state.sequences:
            text = seq.text
            params = seq.request.sampling
            if seq.finish_reason is None and params.stop and not params.include_stop_str_in_output:
                # Hold back what could still become a stop string, so streamed text never shrinks.
                hold = max(len(s) for s in params.stop) - 1
                text = text[: max(0, len(text) - hold)]
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=list(seq.request.output_token_ids),
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        metrics = {"arrival_time": state.arrival_time, **state.metrics}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        metrics["num_preemptions"] = sum(s.request.num_preemptions for s in state.sequences)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outputs,
            finished=state.finished,
            num_cached_tokens=max(0, max(s.request.num_cached_tokens for s in state.sequences)),
            metrics=metrics,
        )

    # ---- observability -----------------------------------------------------

    def warm_up(self) -> None:
        """Run one throwaway request (prefill, then a decode step) before serving.

        The first step pays one-time costs (native kernels loading, allocator
        growth, lazy initialisation); a server's first user must not. The prompt
        fills less than one KV block, so nothing enters the prefix cache and no
        KV event reaches a cluster index.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up() runs before any request is added")
        n = max(1, min(self.config.block_size - 2, self.max_model_len - 2))
        self.add_request("shardline-warm-up", {"prompt_token_ids": [0] * n}, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        while self.has_unfinished_requests():
            self.step()
        self.scheduler.take_events()

    def cached_block_hashes(self) -> list[bytes]:
        """Every block hash the prefix cache can hit now (a snapshot for the cluster's index)."""
        return self.scheduler.kv.pool.cached_hashes()

    def take_kv_events(self) -> list[KVEvent]:
        """Block hashes stored and evicted since the last call (for the cluster's index)."""
        return self.scheduler.take_events()

    def stats(self) -> dict[str, float]:
        """Load figures a router or autoscaler reads."""
        s = self.scheduler
        return {
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "num_free_blocks": s.kv.pool.num_free_blocks,
            "num_blocks": s.kv.num_blocks,
            "kv_usage": s.kv.pool.usage(),
        }
