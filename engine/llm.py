"""The offline API, shaped like vLLM's `LLM` so that its users are at home."""

from __future__ import annotations

import atexit
import itertools
import weakref
from typing import Any, Sequence

from tqdm import tqdm

from shardline.engine.llm_engine import EngineConfig, LLMEngine, PromptType
from shardline.engine.outputs import RequestOutput
from shardline.engine.sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """Generate from a batch of prompts with continuous batching.

    Args:
        model: a Hugging Face folder, or an alias pulled with `shardline pull`.
        dtype: "float32" or "bfloat16".
        max_model_len, max_num_seqs, max_num_batched_tokens, block_size: engine budgets.
        num_kv_blocks / kv_cache_memory_gb: KV cache size, in blocks or as a memory budget.
        enable_prefix_caching: share KV blocks of common prefixes across requests.
        seed: seed of unseeded sampling.
        tensor_parallel_size: split the model over this many ranks.
        distributed_executor_backend: where ranks 1..N-1 run: "ray" (actors in a
            placement group; starts a local Ray cluster or joins the running one)
            or "mp" (local processes).
        placement_strategy: PACK (one node) or SPREAD / STRICT_SPREAD (across nodes), for "ray".

    What it holds (tensor-parallel worker ranks, their process group) is released by
    `shutdown()`, at the end of a `with LLM(...) as llm:` block, when the object is
    collected, or at interpreter exit, whichever comes first.
    """

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: str = "ray",
        placement_strategy: str = "PACK",
        **kwargs: Any,
    ):
        from shardline.engine.distributed import make_launcher
        from shardline.engine.pull import resolve_model

        launcher = None
        if tensor_parallel_size > 1:
            launcher = make_launcher(distributed_executor_backend, placement_strategy)
        config = EngineConfig(model=resolve_model(model), tensor_parallel_size=tensor_parallel_size, **kwargs)
        self.engine = LLMEngine(config, launcher)
        self._ids = itertools.count()
        # Holds the engine, not the LLM: runs on `del llm` as on shutdown(). Registered with atexit
        # here, after the launcher started Ray, so that it runs before Ray's own exit handler.
        self._release = weakref.finalize(self, self.engine.shutdown)
        self._release.atexit = False
        atexit.register(self._release)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and leave their process group; idempotent.

        A tensor-parallel LLM cannot generate afterwards.
        """
        self._release()
        atexit.unregister(self._release)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        A bad prompt raises ValueError before anything runs.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        # Validate everything first so that one bad prompt queues nothing.
        for prompt, params in zip(prompts, params_list):
            _, ids = self.engine.tokenize_prompt(prompt)
            self.engine.validate(ids, params)
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for rid, prompt, params in zip(request_ids, prompts, params_list):
            self.engine.add_request(rid, prompt, params)
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            {
                "prompt": text,
                "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False),
            }
            for text in (tokenizer.apply_chat_template(c, add_generation_prompt) for c in conversations)
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        num_generated = 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step(final_only=True):
                    if out.finished:
                        done[out.request_id] = out
                        num_generated += sum(len(o.token_ids) for o in out.outputs)
                        bar.update(1)
                        bar.set_postfix(output_tok_s=f"{num_generated / max(bar.format_dict['elapsed'], 1e-9):.1f}")
        except BaseException:
            self.engine.abort_request([r for r in request_ids if r not in done])
            raise
        finally:
            bar.close()
        return [done[r] for r in request_ids]
