"""An OpenAI request body, checked and turned into what the engine runs: SamplingParams and token ids.

The one place a completion or chat body becomes engine input, for the HTTP
endpoints (service.py) and for batch rows (batch_worker.py) alike: the model name
(404), sampling parameters and the server's limits (400), an output constraint
that compiles (400 naming its field, before anything queues), tools rendered and
turned into their grammar, the chat template, tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from shardline.deployments.errors import APIError, model_not_found
from shardline.deployments.protocol import ChatCompletionRequest, CompletionRequest
from shardline.deployments.tool_calls import render_messages, tool_grammar
from shardline.engine.sampling_params import SamplingParams, StructuredOutputsParams
from shardline.engine.structured_output import GrammarCompiler
from shardline.engine.tokenizer import ChatTemplateError, Tokenizer

Body = Union[CompletionRequest, ChatCompletionRequest]


@dataclass
class Prepared:
    """One request, ready for the engine.

    Args:
        kind: "completion" or "chat".
        params: the sampling parameters (n, the output constraint included).
        prompts: token ids of each prompt (a completion may carry a batch of them; a chat one).
        prompt_param: the field a prompt's problem is reported against ("prompt" or "messages").
        top_logprobs: candidates per position when logprobs were asked for, else None.
        tool_calls: the answer may hold tool calls, to be parsed out of its text.
    """

    kind: str
    params: SamplingParams
    prompts: list[list[int]]
    prompt_param: str
    top_logprobs: Optional[int]
    tool_calls: bool = False


def _constraint_param(body: Body) -> str:
    return "structured_outputs" if body.structured_outputs is not None else "response_format"


class RequestPreparer:
    """Checks bodies against one served model and its limits.

    Args:
        model_name: the name clients send as `model`.
        tokenizer: the model's tokenizer (chat template included).
        max_logprobs, max_n: the server's limits.
    """

    def __init__(self, model_name: str, tokenizer: Tokenizer, max_logprobs: int, max_n: int):
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_logprobs = max_logprobs
        self.max_n = max_n
        # A constraint is compiled here too, so that a bad one is refused before the request
        # queues; the replica compiles it again, from its own cache.
        self._grammars: Optional[GrammarCompiler] = None

    def completion(self, body: CompletionRequest) -> Prepared:
        self._check_model(body.model)
        params = self._sampling_params(body, "logprobs")
        self._check_constraint(params, _constraint_param(body))
        prompts = [self._encode(p) for p in body.prompts()]
        return Prepared("completion", params, prompts, "prompt", body.logprobs)

    def chat(self, body: ChatCompletionRequest) -> Prepared:
        self._check_model(body.model)
        tool_choice = body.effective_tool_choice
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        try:
            tool_constraint = tool_grammar(tools, tool_choice, body.parallel_tool_calls) if tools else None
        except ValueError as e:
            raise APIError(400, str(e), "tool_choice") from None
        if tool_constraint is not None and (
            body.structured_outputs is not None or (body.response_format is not None and body.response_format.type != "text")
        ):
            raise APIError(
                400, 'tools with a tool_choice other than "none" cannot be combined with response_format or '
                "structured_outputs", "tool_choice",
            )
        params = self._sampling_params(body, "top_logprobs", tool_constraint)
        self._check_constraint(params, "tool_choice" if tool_constraint is not None else _constraint_param(body))
        messages = render_messages([m.as_template_input() for m in body.messages], tools, self.tokenizer.takes_tools)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        except ChatTemplateError as e:
            raise APIError(400, str(e), "messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        top = (body.top_logprobs or 0) if body.logprobs else None
        return Prepared("chat", params, [ids], "messages", top, tool_calls=tool_choice != "none")

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise model_not_found(name)

    def _sampling_params(
        self, body: Body, logprobs_param: str, constraint: Optional[StructuredOutputsParams] = None
    ) -> SamplingParams:
        """`constraint`: the tool calls' grammar, for a chat request whose tools call for one."""
        try:
            params = body.to_sampling_params(constraint)
        except ValueError as e:
            raise APIError(400, str(e), _constraint_param(body) if "structured outputs" in str(e) else None) from None
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise APIError(400, f"{logprobs_param} must be at most {self.max_logprobs}", logprobs_param)
        if params.n > self.max_n:
            raise APIError(400, f"n={params.n} exceeds this server's limit of {self.max_n}", "n")
        return params

    def _check_constraint(self, params: SamplingParams, param: str) -> None:
        if params.structured_outputs is None:
            return
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer.to_json(), self.tokenizer.vocab_size, [])
        try:
            self._grammars.compile(params.structured_outputs)
        except ValueError as e:
            raise APIError(400, str(e), param) from None

    def _encode(self, prompt: Union[str, list[int]]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            if not ids:
                raise APIError(400, "prompt is empty after tokenization", "prompt")
            return ids
        return list(prompt)
