"""Request bodies of the OpenAI API, as strict pydantic models.

Strict: a number where a string belongs, "1" where a number belongs or a field
we do not know is a 400, never silently coerced or dropped (pydantic's lax mode
would turn "0.7" into 0.7 and true into 1). Ranges live here as field
constraints, so the OpenAPI schema that FastAPI publishes states exactly what
the server accepts. Fields beyond OpenAI's (top_k, min_p, ignore_eos, ...) are
vLLM's extensions with vLLM's meaning; clients send them with `extra_body`.

`to_sampling_params` is the one place a request becomes engine SamplingParams.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from shardline.engine.sampling_params import SamplingParams, StructuredOutputsParams

TokenId = Annotated[int, Field(ge=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIdKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The i-th of n completions samples with seed + i, which must still fit in int64
# (ServeConfig caps max_n at this margin).
SEED_MAX = INT64_MAX - 1024
# OpenAI's own ceiling for top_logprobs; ServeConfig.max_logprobs may lower it.
MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send one last chunk with the usage of the whole request.")


class JsonSchemaFormat(_Strict):
    """response_format's json_schema: the schema the answer must fit."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: plain text, any JSON object, or JSON fitting a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('response_format needs json_schema exactly when its type is "json_schema"')
        return self


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extension: exactly one of these constrains the output."""

    json_: Union[dict[str, Any], str, None] = Field(None, alias="json")
    json_object: Optional[bool] = None
    regex: Optional[NonEmptyStr] = None
    choice: Optional[list[NonEmptyStr]] = None
    grammar: Optional[NonEmptyStr] = None


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(description="The served model's name (GET /v1/models).")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, description="Completions per prompt (capped by the server's max_n).")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=SEED_MAX)
    stop: Union[NonEmptyStr, list[NonEmptyStr], None] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[TokenIdKey, Annotated[float, Field(ge=-100.0, le=100.0)]]] = None
    user: Optional[str] = None
    # vLLM's extensions.
    top_k: int = Field(-1, ge=-1, description="Keep the k most likely tokens (-1 or 0: off).")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[TokenId]] = None
    skip_special_tokens: bool = True
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = Field(
        None, description="vLLM's extension: the output fits a JSON schema, a regex, a choice or a grammar (Lark or GBNF)."
    )

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def constraint(self) -> Optional[StructuredOutputsParams]:
        """What the output must fit, from response_format or structured_outputs (ValueError for both)."""
        fmt = self.response_format if self.response_format is not None and self.response_format.type != "text" else None
        if fmt is not None and self.structured_outputs is not None:
            raise ValueError("send response_format or structured_outputs, not both")
        if fmt is not None:
            if fmt.type == "json_object":
                return StructuredOutputsParams(json_object=True)
            return StructuredOutputsParams(json=fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {})
        so = self.structured_outputs
        if so is None:
            return None
        return StructuredOutputsParams(
            json=so.json_, json_object=bool(so.json_object), regex=so.regex, choice=so.choice, grammar=so.grammar
        )

    def _sampling(
        self, max_tokens: Optional[int], logprobs: Optional[int], constraint: Optional[StructuredOutputsParams] = None
    ) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=constraint if constraint is not None else self.constraint(),
        )


PromptInput = Union[
    NonEmptyStr,
    Annotated[list[TokenId], Field(min_length=1)],
    Annotated[list[NonEmptyStr], Field(min_length=1)],
    Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)],
]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: PromptInput = Field(
        description="Text, token ids, or a batch of either; each prompt gets n choices."
    )
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Literal[False] = Field(False, description="Not supported: must be false.")

    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)

    def to_sampling_params(self, constraint: Optional[StructuredOutputsParams] = None) -> SamplingParams:
        return self._sampling(self.max_tokens, self.logprobs, constraint)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionCall(_Strict):
    name: FunctionName
    arguments: str = Field(description="The arguments, as JSON text.")


class ToolCallMessage(_Strict):
    """A call the assistant made earlier in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Strict):
    name: FunctionName
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="The arguments' JSON schema.")
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallMessage]] = None
    tool_call_id: Optional[str] = None

    def as_template_input(self) -> dict[str, Any]:
        """The plain {"role", "content"} a chat template expects (with tool_calls and tool_call_id)."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="Deprecated by OpenAI; max_completion_tokens wins.")
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(
        None, description='"auto" when tools are given (the model decides), else "none".'
    )
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self):
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice requires tools")
        return self

    @property
    def effective_tool_choice(self) -> Union[str, dict[str, Any]]:
        """"none" without tools; "auto" when tools come without a choice; else the choice (a dict when named)."""
        if not self.tools:
            return "none"
        if self.tool_choice is None:
            return "auto"
        return self.tool_choice if isinstance(self.tool_choice, str) else self.tool_choice.model_dump()

    def to_sampling_params(self, constraint: Optional[StructuredOutputsParams] = None) -> SamplingParams:
        """`constraint`: the tool calls' grammar, where the tools call for one."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, logprobs, constraint)
