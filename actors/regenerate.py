"""Online regeneration (DESIGN.md §4): the target writes every assistant turn, turn by turn, then the conversations
become a training Batch with eagle3.data's own tokenisation (chat template, assistant-only loss mask, truncation,
packing). Shared by every target backend: all it needs from one is its `generate`. The answering loop alone
(`answer_conversations`, the actors' `answer`) also serves batch regeneration into a stored dataset
(jobs/regenerate.py).

Multi-turn: reply 1 is generated from [system?, user 1], then [.., user 1, reply 1, user 2] gives reply 2, and so
on; one `generate` call per turn index covers all conversations of the request that still have a user turn left.
Responses travel as text (decoded without special tokens, re-tokenised with the conversation), exactly like a
dataset's responses; for ordinary text the re-tokenised ids are the generated ones.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jinja2

from actors.protocol import GenerationParams
from eagle3.data import Batch, DataConfig, DataError, Sample, collate, pack, tokenize_conversation

GenerateFn = Callable[[list[list[int]], GenerationParams], list[list[int]]]
"""`TargetBackend.generate`: prompts (token ids) → response ids without the prompt and without the stop token."""

_TURN_SEED_STRIDE = 1_000_003  # request seeds are consecutive: keep every (request, turn) seed distinct


@dataclass(kw_only=True)
class Regenerated:
    """A request's conversations with target-written replies, as one Batch."""

    batch: Batch
    generated_tokens: int  # response tokens the target wrote, all turns and conversations (kept or not)
    generate_seconds: float  # time spent inside `generate`


def prompt_turns(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The system and user turns of a conversation, in order: what regeneration answers (assistant turns dropped)."""
    turns = [m for m in messages if m["role"] != "assistant"]
    if not any(m["role"] == "user" for m in turns):
        raise DataError("no user turn to answer, so nothing to regenerate; remove the record", "no_user_turn")
    return turns


def end_of_turn_id(tokenizer) -> int:
    """The special token that closes an assistant turn in the tokenizer's chat template (<|im_end|>, <|eot_id|>..).

    Found the way the loss mask finds it: the last masked token of a rendered one-turn exchange."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    sample = tokenize_conversation(probe, tokenizer, max_length=1 << 30, overlong="truncate")
    return int(sample.input_ids[sample.loss_mask][-1])


def stop_token_ids(tokenizer) -> list[int]:
    """Where a reply ends: the tokenizer's EOS and the chat template's end-of-turn token."""
    return sorted({end_of_turn_id(tokenizer)} | ({tokenizer.eos_token_id} - {None}))


def prompt_ids(messages: list[dict[str, str]], tokenizer) -> list[int]:
    """Token ids of `messages` rendered with the chat template and the assistant generation prompt."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise DataError(f"the chat template rejects this conversation ({e})", "template_error") from e
    # As eagle3.data tokenises the full conversation: the template writes every special token itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(kw_only=True)
class Answered:
    """Conversations with target-written assistant turns (what `answer_conversations` and the actors' `answer`
    return)."""

    dialogs: list[list[dict[str, str]]]  # per conversation its turns [{"role", "content"}], replies included; cut
    # before the first user turn that did not fit or got an empty reply (so possibly without any reply)
    generated_tokens: int  # response tokens the target wrote, all turns and conversations (kept or not)
    generate_seconds: float  # time spent inside `generate`


def answer_conversations(
    conversations: Sequence[Sequence[dict[str, str]]],
    tokenizer,
    generate: GenerateFn,
    params: GenerationParams,
    max_length: int,
) -> Answered:
    """Let the target answer every user turn of `conversations` (system/user turns, see `prompt_turns`), turn by
    turn: one `generate` call per turn index over the conversations that still have a user turn left, turn t
    sampling with seed params.seed + _TURN_SEED_STRIDE * t.

    A conversation stops before a user turn whose prompt already fills `max_length` (its reply would be cut away)
    and before an empty reply (nothing to train on); the dialogs end with the last reply written."""
    dialogs: list[list[dict[str, str]]] = [[] for _ in conversations]  # turns so far, replies included
    pending = [list(c) for c in conversations]  # turns not yet added
    generated, seconds, turn = 0, 0.0, 0
    while True:
        active, prompts = [], []
        for c in range(len(dialogs)):
            while pending[c] and pending[c][0]["role"] != "user":
                dialogs[c].append(pending[c].pop(0))  # system turns before the next user turn
            if not pending[c]:
                continue
            dialogs[c].append(pending[c].pop(0))
            ids = prompt_ids(dialogs[c], tokenizer)
            if len(ids) >= max_length:
                dialogs[c].pop()
                pending[c] = []
                continue
            active.append(c)
            prompts.append(ids)
        if not active:
            break
        t0 = time.perf_counter()
        replies = generate(prompts, dataclasses.replace(params, seed=params.seed + _TURN_SEED_STRIDE * turn))
        seconds += time.perf_counter() - t0
        if len(replies) != len(prompts):
            raise RuntimeError(f"generate returned {len(replies)} responses for {len(prompts)} prompts")
        for c, reply in zip(active, replies):
            generated += len(reply)
            text = tokenizer.decode(reply, skip_special_tokens=True)
            if not text.strip():
                dialogs[c].pop()
                pending[c] = []
                continue
            dialogs[c].append({"role": "assistant", "content": text})
        turn += 1
    return Answered(dialogs=dialogs, generated_tokens=generated, generate_seconds=seconds)


def regenerate_batch(
    conversations: Sequence[Sequence[dict[str, str]]],
    sample_ids: Sequence[str],
    tokenizer,
    generate: GenerateFn,
    params: GenerationParams,
    data: DataConfig,
) -> Regenerated:
    """Let the target answer every user turn of `conversations` (`answer_conversations` with data.max_length) and
    tokenise the result into one Batch (data.pack: packed rows of data.max_length, else one row each).

    A conversation left without any reply is dropped. Raises ValueError when no conversation of the request gives
    a trainable sample.
    """
    if len(conversations) != len(sample_ids) or not conversations:
        raise ValueError(f"regenerate: {len(conversations)} conversations and {len(sample_ids)} sample ids; "
                         "give one id per conversation, at least one conversation")
    answered = answer_conversations(conversations, tokenizer, generate, params, data.max_length)
    dialogs = answered.dialogs
    samples: list[Sample] = []
    for sid, dialog in zip(sample_ids, dialogs):
        if not any(m["role"] == "assistant" for m in dialog):
            continue
        sample = tokenize_conversation(dialog, tokenizer, max_length=data.max_length, overlong=data.overlong,
                                       sample_id=sid)
        if sample is not None:
            samples.append(sample)
    if not samples:
        raise ValueError(
            f"regenerate: none of the {len(dialogs)} conversations ({', '.join(sample_ids)}) gave a trainable sample "
            f"(empty first replies, or prompts/replies over data.max_length={data.max_length}); raise data.max_length "
            "or remove these records"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = (pack(samples, data.max_length, rows_per_batch=len(samples), pad_token_id=pad)[0] if data.pack
             else collate(samples, pad))
    return Regenerated(batch=batch, generated_tokens=answered.generated_tokens,
                       generate_seconds=answered.generate_seconds)


def cut_at_stop(reply: list[int], stops) -> list[int]:
    """The reply up to (not including) its first stop token."""
    return reply[: next((k for k, t in enumerate(reply) if t in stops), len(reply))]


def regenerate_features(request, tokenizer, generate: Callable, forward: Callable):
    """A backend's `regenerate`: write the request's assistant turns with `generate`, then `forward` the batch;
    the TargetBatch carries the whole time and the generation counts."""
    t0 = time.perf_counter()
    regen = regenerate_batch(request.conversations, request.sample_ids, tokenizer, generate, request.params,
                             request.data)
    out = forward(regen.batch)
    out.target_seconds = time.perf_counter() - t0
    out.generated_tokens, out.generate_seconds = regen.generated_tokens, regen.generate_seconds
    return out
