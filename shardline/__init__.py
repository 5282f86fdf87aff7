"""shardline: an LLM serving cluster on Ray, over an engine of its own.

    from shardline import LLM, SamplingParams
    llm = LLM("smollm2-135m")
    print(llm.generate("The capital of France is", SamplingParams(temperature=0))[0].outputs[0].text)

The project's folders install as the subpackages of this one:

    shardline.kernels      compute kernels (torch reference, native CPU, Triton)
    shardline.engine       one replica's engine; `LLM` is its offline API
    shardline.deployments  Ray Serve: the OpenAI ingress, model replicas, Ray tensor-parallel ranks
    shardline.cluster      the head node's control plane (queue, KV index, placement, tenants)
    shardline.autoscaling  the queue-depth policy and the trace simulator
    shardline.cli          the `shardline` command

The engine's names are loaded on first use, so that `import shardline.cluster`
(the scheduler actor, the autoscaling policy) does not pay for torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_ENGINE_EXPORTS = {
    "LLM": "shardline.engine.llm",
    "SamplingParams": "shardline.engine.sampling_params",
    "StructuredOutputsParams": "shardline.engine.sampling_params",
    "RequestOutput": "shardline.engine.outputs",
    "CompletionOutput": "shardline.engine.outputs",
    "Logprob": "shardline.engine.outputs",
    "EngineConfig": "shardline.engine.llm_engine",
    "LLMEngine": "shardline.engine.llm_engine",
    "AsyncLLMEngine": "shardline.engine.async_engine",
}

__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "EngineConfig",
    "LLMEngine",
    "AsyncLLMEngine",
    "__version__",
]

if TYPE_CHECKING:
    from shardline.engine.async_engine import AsyncLLMEngine
    from shardline.engine.llm import LLM
    from shardline.engine.llm_engine import EngineConfig, LLMEngine
    from shardline.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from shardline.engine.sampling_params import SamplingParams, StructuredOutputsParams


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        value = version("shardline")
    elif name in _ENGINE_EXPORTS:
        value = getattr(import_module(_ENGINE_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'shardline' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
