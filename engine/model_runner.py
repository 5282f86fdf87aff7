"""Turns a SchedulerOutput into tensors, runs the model and samples.

Inputs are prepared once per step with numpy over the whole batch (no
per-token Python loops): token ids, positions, cache slots, block tables.
Decode tokens (one per sequence) are packed first, prefill chunks after, as
AttentionMetadata expects.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from shardline.engine.distributed import StepInput, TensorParallelGroup, run_step
from shardline.engine.model import AttentionMetadata, Transformer
from shardline.engine.outputs import PositionLogprobs
from shardline.engine.sampler import Sampler, SamplingRow
from shardline.engine.scheduler import ScheduledRequest, SchedulerOutput
from shardline.engine.structured_output import BitmaskFiller


@dataclass
class ModelInput:
    """One step's packed tensors (decodes first) and how they map back to the schedule."""

    step: StepInput
    # Indices into SchedulerOutput.scheduled, in packed order.
    order: list[int]
    # The scheduled index of each sampled row (step.sample_rows).
    sample_indices: list[int]


@dataclass
class RunnerOutput:
    """Sampled token (or None) and logprobs per scheduled request, in scheduling order."""

    token_ids: list[int | None] = field(default_factory=list)
    logprobs: list[PositionLogprobs | None] = field(default_factory=list)


def _block_table(rows: list[list[int]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0) or 1
    table = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table


class ModelRunner:
    """Owns the model (rank 0's shard under tensor parallelism), its KV cache and the sampler."""

    def __init__(
        self,
        model: Transformer,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        seed: int | None,
        tp_group: TensorParallelGroup | None = None,
    ):
        self.model = model
        self.block_size = block_size
        self.tp_group = tp_group
        if model.layers[0].attention.k_cache is None:
            self.model.setup_kv_cache(num_blocks, block_size, kv_dtype)
        self.sampler = Sampler(seed)
        self.vocab_size = model.config.vocab_size
        # Grammar masks are filled on another thread while the forward pass runs (both leave the GIL).
        self.overlap_grammar = True
        self._mask_filler: BitmaskFiller | None = None
        self._mask_thread: ThreadPoolExecutor | None = None

    @property
    def fused_decode_available(self) -> bool:
        """Whether a decode-only step takes the model's whole-stack kernel (single process only)."""
        return self.tp_group is None and self.model.runs_natively(with_prefill=False)

    def prepare(self, out: SchedulerOutput) -> ModelInput:
        """Pack the scheduled requests of one step into tensors."""
        sched = out.scheduled
        decodes = [i for i, s in enumerate(sched) if s.num_new_tokens == 1]
        prefills = [i for i, s in enumerate(sched) if s.num_new_tokens > 1]
        order = decodes + prefills
        reqs: list[ScheduledRequest] = [sched[i] for i in order]

        counts = np.array([s.num_new_tokens for s in reqs], dtype=np.int64)
        starts = np.array([s.start_pos for s in reqs], dtype=np.int64)
        ends = np.cumsum(counts)
        total = int(ends[-1])
        # positions[t] = start of t's sequence + t's offset within its chunk
        seq_of_token = np.repeat(np.arange(len(reqs)), counts)
        positions = starts[seq_of_token] + np.arange(total) - (ends - counts)[seq_of_token]
        tokens: list[int] = []
        for s in reqs:
            tokens.extend(s.request.all_token_ids[s.start_pos : s.start_pos + s.num_new_tokens])
        table = _block_table([s.block_ids for s in reqs])
        bs = self.block_size
        slots = table[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        context_lens = (starts + counts).astype(np.int32)

        nd = len(decodes)
        prefill_starts = np.concatenate(([0], ends[nd:] - (ends[nd - 1] if nd else 0)))
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots),
            num_decode_tokens=nd,
            decode_block_tables=torch.from_numpy(table[:nd]),
            decode_context_lens=torch.from_numpy(context_lens[:nd]),
            prefill_block_tables=torch.from_numpy(table[nd:]),
            prefill_query_start_loc=torch.from_numpy(prefill_starts.astype(np.int32)),
            prefill_context_lens=torch.from_numpy(context_lens[nd:]),
        )
        sample_pos = [j for j, s in enumerate(reqs) if s.sample]
        step = StepInput(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            positions=torch.from_numpy(positions),
            meta=meta,
            sample_rows=torch.from_numpy(ends[sample_pos] - 1),
        )
        return ModelInput(step=step, order=order, sample_indices=[order[j] for j in sample_pos])

    @torch.inference_mode()
    def compute_logits(self, out: SchedulerOutput) -> tuple[torch.Tensor | None, list[int]]:
        """Run the model (on every rank); fp32 logits of the sampled rows and their scheduled indices."""
        inp = self.prepare(out)
        if self.tp_group is not None:
            return self.tp_group.run(self.model, inp.step), inp.sample_indices
        return run_step(self.model, inp.step), inp.sample_indices

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step and sample a token for every request that reached its end."""
        constrained = [s.request for s in out.scheduled if s.sample and s.request.grammar is not None]
        masks = self._start_masks(constrained)
        logits, indices = self.compute_logits(out)
        result = RunnerOutput(token_ids=[None] * len(out.scheduled), logprobs=[None] * len(out.scheduled))
        if not indices:
            return result
        bitmask = masks.result() if masks is not None else None
        mask_row = {id(req): k for k, req in enumerate(constrained)}
        rows = []
        for i in indices:
            req = out.scheduled[i].request
            rows.append(
                SamplingRow(
                    req.sampling, req.prompt_token_ids, req.output_token_ids, req.stop_token_ids,
                    grammar=req.grammar, mask_row=mask_row.get(id(req)),
                )
            )
        sampled = self.sampler(logits, rows, bitmask)
        for j, i in enumerate(indices):
            result.token_ids[i] = sampled.token_ids[j]
            result.logprobs[i] = sampled.logprobs[j]
        return result

    def _start_masks(self, constrained: list) -> Future | None:
        """Begin filling the grammar masks of this step's constrained rows; None when there are none."""
        if not constrained:
            return None
        if self._mask_filler is None:
            self._mask_filler = BitmaskFiller(self.vocab_size)
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="shardline-grammar")
        states = [req.grammar for req in constrained]
        if not self.overlap_grammar:
            done: Future = Future()
            done.set_result(self._mask_filler.fill(states))
            return done
        return self._mask_thread.submit(self._mask_filler.fill, states)
