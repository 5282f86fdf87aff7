"""shardline's inference engine: one replica, paged KV cache, continuous batching.

    from shardline.engine import LLM, SamplingParams
    llm = LLM("smollm2-135m")
    print(llm.generate("The capital of France is", SamplingParams(temperature=0))[0].outputs[0].text)

Never imports ray: the cluster layers wrap it from outside.
"""

from shardline.engine.async_engine import AsyncLLMEngine, EngineDeadError
from shardline.engine.llm import LLM
from shardline.engine.llm_engine import EngineConfig, LLMEngine
from shardline.engine.outputs import CompletionOutput, Logprob, RequestOutput
from shardline.engine.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = [
    "LLM",
    "LLMEngine",
    "AsyncLLMEngine",
    "EngineConfig",
    "EngineDeadError",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
]
