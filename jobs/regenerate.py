"""Batch regeneration: the target answers every prompt of a dataset, written as a new dataset to train on.

`python -m jobs.regenerate --preset smollm2-sharegpt-cpu --out DIR` (also `aerie regenerate`), then any run trains on
it, for as many epochs as it likes, with `--set data.path=DIR`.

The whole topology is `main`: config → source prompts (data.*: on_bad_record, max_samples, over-long first prompts
dropped, as `data.regenerate`'s online path reads them) → output folder checked against its stamp → MLflow run →
Ray → target actors → chunks of data.regen_batch_size conversations answered turn by turn by the actors (`answer`:
one batched generate per turn index; vLLM where target.backend=vllm), two calls in flight per actor → one part file
per chunk, written in chunk order → stamp marked complete.

Output folder: part-00000.jsonl, part-00001.jsonl, ... (chunk i = conversations [i*N, (i+1)*N) in file order, as
ShareGPT records {"id", "conversations": [{"from": "system"|"human"|"gpt", "value"}]}; a conversation the target
gave no reply is left out) and aerie_regenerated.json, the stamp that training reads (jobs.data_prep.read_stamp).
Every file is written through a dot-file and a rename, so a part is whole or absent. Chunk i samples with seed
data.regen_seed + i, so a re-run with the same settings (the stamp's `settings`) skips the parts that exist and
writes the rest exactly as an uninterrupted run would; other settings are refused (use another --out, or --fresh).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

from jobs.config import PRESETS, JobConfig, flatten, load_config, to_dict
from jobs.data_prep import STAMP, load_tokenizer, regen_requests, tokenizer_identity

FROM = {"system": "system", "user": "human", "assistant": "gpt"}  # roles → ShareGPT's "from"
IN_FLIGHT_PER_ACTOR = 2  # one call generating while the next waits: the actor never idles between chunks
URI_FIX = "start the server or pass --set tracking.uri=... (empty = embedded sqlite store in the run folder)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aerie regenerate", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="named run: " + " | ".join(PRESETS))
    p.add_argument("--config", default=None, help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--out", default=None, help="output folder (default <output_dir>/regenerated/<name>)")
    p.add_argument("--fresh", action="store_true",
                   help="discard the folder's parts and stamp and regenerate everything (other settings allowed)")
    p.add_argument("--address", default=None,
                   help="Ray address; default: $RAY_ADDRESS (set by `ray job submit`), else a new local Ray")
    p.add_argument("--fail-after-parts", type=int, default=0, help=argparse.SUPPRESS)  # fault injection (tests)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Regenerate cfg.data into the output folder; returns its stamp (see module docstring)."""
    args = parse_args(argv)
    cfg = load_config(args.preset, args.config, args.overrides)
    out = Path(args.out).absolute() if args.out else Path(cfg.output_dir).absolute() / "regenerated" / cfg.name

    from eagle3.data import _check_tokenizer
    from eagle3.sources import resolve_parts

    parts = resolve_parts(cfg.data.path, cfg.data.split)  # a bad path fails before the tokenizer loads
    if any(Path(p.path).absolute().parent == out for p in parts):
        raise ValueError(f"--out {out} is the folder data.path reads; write the regenerated dataset elsewhere")
    tok = load_tokenizer(cfg.target.model)
    _check_tokenizer(tok)
    settings = job_settings(cfg, tok, parts)
    with folder_lock(out):
        stamp = check_folder(out, settings, fresh=args.fresh)  # before anything is written
        if stamp is not None and stamp.get("complete") and all(part_path(out, i).exists()
                                                               for i in range(stamp["chunks"])):
            print(f"[aerie regenerate] {out} is already complete with these settings ({stamp['records']} records); "
                  "nothing to do (--fresh regenerates it)", file=sys.stderr, flush=True)
            return stamp
        chunks, stats = source_chunks(cfg, tok, parts)  # bad records fail here, with nothing written
        if args.fresh:
            clear_folder(out)
        for f in out.glob(".*.tmp-*"):  # a killed writer's temp file (the lock says no writer is alive)
            f.unlink()
        done = [i for i in range(len(chunks)) if part_path(out, i).exists()]

        from jobs.tracking import close_run, open_run

        tracker = open_run(cfg.tracking_uri(), cfg.tracking.experiment, f"{cfg.name}-regenerate", fresh=True,
                           run_id=stamp.get("mlflow_run_id") if stamp else None, unreachable_fix=URI_FIX)
        # The dtype the written parts were generated in (target.dtype=auto resolves per machine): kept across resumes.
        written_dtype = (stamp or {}).get("target_resolved_dtype") if done else None
        stamp = {**new_stamp(cfg, settings, chunks, stats), "created": (stamp or {}).get("created", time.time()),
                 "mlflow_uri": cfg.tracking_uri(), "mlflow_run_id": tracker.run_id}
        if written_dtype:
            stamp["target_resolved_dtype"] = written_dtype
        write_atomic(out / STAMP, json.dumps(stamp, indent=2).encode())
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items())) or "none"
        print(f"[aerie regenerate] {stamp['conversations']} conversations of {stats.records_seen} records (bad "
              f"records skipped: {skipped}; {stats.dropped_overlong} with a first prompt over data.max_length) in "
              f"{len(chunks)} chunks of {cfg.data.regen_batch_size}, {len(done)} already written; target "
              f"{cfg.target.model} ({cfg.target.backend}) x {cfg.target.num_actors}; into {out}",
              file=sys.stderr, flush=True)
        from jobs.watchdog import Watchdog, local_ray_pids

        # kill -9 / OOM of this process: the guard marks the run KILLED and stops the Ray processes it started.
        watchdog = Watchdog(cfg.tracking_uri(), tracker.run_id)
        try:
            import ray

            from jobs.targets import start_target_actors
            from jobs.train import sigterm_as_interrupt

            started_ray = False
            with sigterm_as_interrupt():
                try:
                    if not ray.is_initialized():
                        ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local",
                                 log_to_driver=True)
                        started_ray = True
                        watchdog.watch_pids(local_ray_pids())
                    tracker.log_params({**flatten(to_dict(cfg)), "regenerate.out": str(out),
                                        "regenerate.chunks": len(chunks)})
                    run = {"generated_tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0}  # all parts written already
                    if len(done) < len(chunks):
                        group = start_target_actors(cfg.target)
                        try:
                            if written_dtype and group.info.dtype != written_dtype:
                                raise ValueError(
                                    f"{out}: its {len(done)} written part(s) were generated in {written_dtype}, but "
                                    f"target.dtype={cfg.target.dtype!r} resolves to {group.info.dtype} here; set "
                                    f"--set target.dtype={written_dtype} to resume them, or --fresh to start over")
                            stamp["target_resolved_dtype"] = group.info.dtype
                            write_atomic(out / STAMP, json.dumps(stamp, indent=2).encode())
                            run = write_parts(cfg, group.actors, chunks, done, out, tracker, args.fail_after_parts)
                        finally:
                            group.shutdown()
                finally:
                    if started_ray:
                        ray.shutdown()
            stamp = {**stamp, **output_counts(out, len(chunks), tok), "complete": True, "completed": time.time()}
            tracker.log_metrics({k: stamp[k] for k in ("records", "response_tokens")}, step=len(chunks))
            close_run(tracker, "FINISHED")
        except BaseException as err:  # the run is never left RUNNING
            try:
                close_run(tracker, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", err)
            except Exception as close_err:  # noqa: BLE001 - the job's own error is the one to see; the guard retries
                print(f"[aerie regenerate] could not close MLflow run {tracker.run_id}: {close_err}", file=sys.stderr)
            else:
                watchdog.done()
            raise
        watchdog.done()
        write_atomic(out / STAMP, json.dumps(stamp, indent=2).encode())  # last: a complete stamp = a finished job
    print(f"[aerie regenerate] done: {stamp['records']} records ({stamp['assistant_turns']} replies, "
          f"{stamp['response_tokens']} tokens) in {out}; this run generated {run['generated_tokens']} tokens in "
          f"{run['seconds']:.1f} s ({run['tokens_per_s']:.1f} tokens/s); MLflow run {tracker.run_id}\n"
          f"  train on it: --set data.path={out}", file=sys.stderr, flush=True)
    return stamp


# ---------------------------------------------------------------------------------------------------------------
# Inputs and settings


def job_settings(cfg: JobConfig, tok, parts) -> dict:
    """Everything that decides the output's bytes: a re-run into the same folder must repeat these.

    Not counted: data.on_bad_record (a stamp exists only if reading succeeded, and then skip and error read the same
    records), placement (target.num_actors, resources, threads, device) and data.path's spelling (the content
    fingerprint counts, not the path)."""
    from actors.models import resolve_model, weights_fingerprint
    from eagle3.sources import fingerprint

    d = cfg.data
    return {
        "target.model": cfg.target.model, "target.revision": weights_fingerprint(resolve_model(cfg.target.model)),
        "target.backend": cfg.target.backend, "target.dtype": cfg.target.dtype, "tokenizer": tokenizer_identity(tok),
        "source.fingerprint": fingerprint(parts), "data.max_length": d.max_length, "data.max_samples": d.max_samples,
        "data.regen_batch_size": d.regen_batch_size, "data.regen_max_new_tokens": d.regen_max_new_tokens,
        "data.regen_temperature": d.regen_temperature, "data.regen_top_p": d.regen_top_p,
        "data.regen_seed": d.regen_seed,
    }


def source_chunks(cfg: JobConfig, tok, parts):
    """(chunks, stats): the prompts in RegenRequests of data.regen_batch_size conversations, chunk i seeded with
    regen_seed + i; read as the online path reads them (jobs.data_prep.regen_requests)."""
    data = dataclasses.replace(cfg.data, regen_conversations=cfg.data.regen_batch_size)
    chunks, stats = regen_requests(data, tok, parts)
    if not chunks:
        raise ValueError(f"data.path={cfg.data.path!r} gave no prompts to regenerate ({stats.summary()}); "
                         "check the files and data.*")
    return chunks, stats


def new_stamp(cfg: JobConfig, settings: dict, chunks, stats) -> dict:
    """The stamp of an unfinished job: what training reads (target, tokenizer, sampling, source) and the settings a
    re-run must repeat; `complete` and the output's counts are added when the last part is written."""
    from importlib.metadata import version

    d = cfg.data
    return {
        "aerie_version": version("aerie"), "complete": False,
        "target": cfg.target.model, "tokenizer": settings["tokenizer"],
        "sampling": {"max_new_tokens": d.regen_max_new_tokens, "temperature": d.regen_temperature,
                     "top_p": d.regen_top_p, "seed": d.regen_seed},
        "source": {"path": d.path, "split": d.split, "fingerprint": settings["source.fingerprint"]},
        "settings": settings, "chunks": len(chunks), "conversations": sum(len(c.conversations) for c in chunks),
        "input": {"records_seen": stats.records_seen, "skipped": stats.skipped,
                  "dropped_overlong": stats.dropped_overlong, "incomplete_tail": stats.incomplete_tail},
    }


# ---------------------------------------------------------------------------------------------------------------
# The output folder


def part_path(out: Path, i: int) -> Path:
    return out / f"part-{i:05d}.jsonl"


def check_folder(out: Path, settings: dict, fresh: bool) -> dict | None:
    """The stamp of an earlier job in `out` with the same settings (None: a new or empty folder, or `fresh`).

    Refused: a stamp with other settings (naming them), an unreadable stamp, and a folder with files that no
    regeneration job wrote (they would become part of the dataset)."""
    stamp_file = out / STAMP
    if not stamp_file.exists():
        foreign = sorted(f.name for f in out.iterdir() if not f.name.startswith("."))
        if foreign:
            raise ValueError(f"--out {out} already holds files that no regeneration job wrote ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}), which would become part of the dataset; choose "
                             "an empty or new --out folder")
        return None
    if fresh:
        return None
    try:
        stamp = json.loads(stamp_file.read_text())
        old = stamp["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{stamp_file} cannot be read ({err}); pass --fresh to regenerate {out} from scratch, or "
                         "choose another --out") from err
    absent = "(unset)"
    diff = [f"{k} {old.get(k, absent)!r} -> {settings.get(k, absent)!r}" for k in sorted(old.keys() | settings.keys())
            if old.get(k, absent) != settings.get(k, absent)]
    if diff:
        raise ValueError(f"--out {out} was regenerated with other settings: {'; '.join(diff)}. Its parts would mix "
                         "both; use another --out, or pass --fresh to discard them and start over")
    return stamp


def clear_folder(out: Path) -> None:
    """--fresh: remove the parts and the stamp (check_folder made sure the folder holds nothing else)."""
    for f in [*out.glob("part-*.jsonl"), out / STAMP]:
        f.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(out: Path):
    """One job per output folder: a second one would write the same parts."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another regeneration job is writing {out}; wait for it or stop it") from None
        yield


def write_atomic(path: Path, data: bytes) -> None:
    """`data` into `path` through a dot-file in the same folder (fsync, rename, fsync of the folder): readers and
    re-runs see the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_of(sample_id: str, dialog: list[dict[str, str]]) -> dict | None:
    """A ShareGPT record of an answered dialog, ending with its last reply; None if the target wrote no reply."""
    end = max((k + 1 for k, m in enumerate(dialog) if m["role"] == "assistant"), default=0)
    if not end:
        return None
    return {"id": sample_id, "conversations": [{"from": FROM[m["role"]], "value": m["content"]} for m in dialog[:end]]}


def output_counts(out: Path, num_chunks: int, tok) -> dict:
    """Counts of the finished folder, read back from its parts: records, replies, their tokens (re-tokenised), and
    the sha256 of the parts (eagle3.sources.fingerprint, as data.path=out would read them)."""
    from eagle3.sources import fingerprint, resolve_parts

    records = turns = tokens = 0
    for i in range(num_chunks):
        for line in part_path(out, i).read_text().splitlines():
            replies = [t["value"] for t in json.loads(line)["conversations"] if t["from"] == "gpt"]
            records, turns = records + 1, turns + len(replies)
            tokens += sum(len(ids) for ids in tok(replies, add_special_tokens=False)["input_ids"]) if replies else 0
    return {"records": records, "assistant_turns": turns, "response_tokens": tokens,
            "output_fingerprint": fingerprint(resolve_parts(str(out)))}


# ---------------------------------------------------------------------------------------------------------------
# Generation


def answer_chunks(actors: Sequence, chunks, todo: Sequence[int], max_length: int) -> Iterator[tuple[int, object]]:
    """(chunk index, actors.regenerate.Answered) for each chunk of `todo`, in that order.

    IN_FLIGHT_PER_ACTOR calls per actor stay in flight (`answer.remote`, collected with ray.wait); a result that
    arrives before an earlier chunk's waits for its turn, and no chunk is sent more than a window of calls ahead of
    the oldest unfinished one, so early results cannot pile up behind a slow chunk."""
    import ray

    free = [a for _ in range(IN_FLIGHT_PER_ACTOR) for a in actors]  # round robin: every actor gets work first
    window = 2 * len(free)
    queue, order = deque(todo), deque(todo)
    in_flight: dict = {}  # ObjectRef → (chunk index, actor)
    arrived: dict[int, object] = {}
    while order:
        while queue and free and len(in_flight) + len(arrived) < window:
            i, actor = queue.popleft(), free.pop(0)
            in_flight[actor.answer.remote(chunks[i].conversations, chunks[i].params, max_length)] = (i, actor)
        if order[0] not in arrived:  # order[0] is in flight: the queue is sent in order
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            i, actor = in_flight.pop(ref)
            try:
                arrived[i] = ray.get(ref)
            except ray.exceptions.RayError as err:  # the hint first: the CLI keeps a Ray error's first and last line
                raise RuntimeError(f"chunk {i} failed on its target actor; the parts written so far are kept and "
                                   f"running the same command again continues from them: {err}") from err
            free.append(actor)
        while order and order[0] in arrived:
            i = order.popleft()
            yield i, arrived.pop(i)


def write_parts(cfg: JobConfig, actors: Sequence, chunks, done: Sequence[int], out: Path, tracker,
                fail_after_parts: int = 0) -> dict:
    """Answer the chunks not yet written and write one part per chunk, in chunk order; progress bar and MLflow
    metrics (step = parts written). Returns this invocation's generated_tokens, seconds and tokens_per_s."""
    from tqdm import tqdm

    from jobs.tracking import metric_history

    written = set(done)
    todo = [i for i in range(len(chunks)) if i not in written]
    conversations_done = sum(len(chunks[i].conversations) for i in written)
    base = metric_history(tracker, "generated_tokens")  # a resumed run counts on
    total_tokens = int(base[-1][1]) if base else 0
    generated, t0 = 0, time.perf_counter()
    bar = tqdm(total=sum(len(c.conversations) for c in chunks), initial=conversations_done, desc="regenerate",
               unit="conv", dynamic_ncols=True, file=sys.stderr)
    try:
        for n, (i, answered) in enumerate(answer_chunks(actors, chunks, todo, cfg.data.max_length), 1):
            records = [r for sid, dialog in zip(chunks[i].sample_ids, answered.dialogs)
                       if (r := record_of(sid, dialog)) is not None]
            write_atomic(part_path(out, i), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
            written.add(i)
            conversations_done += len(chunks[i].conversations)
            generated += answered.generated_tokens
            total_tokens += answered.generated_tokens
            speed = generated / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(tok_s=f"{speed:.0f}", refresh=False)
            bar.update(len(chunks[i].conversations))
            tracker.log_metrics({"generated_tokens": total_tokens, "tokens_per_s": speed,
                                 "conversations_done": conversations_done, "chunks_done": len(written)},
                                step=len(written))
            if fail_after_parts and n >= fail_after_parts:
                raise RuntimeError(f"fault injection: stopped after {n} parts (--fail-after-parts)")
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return {"generated_tokens": generated, "seconds": seconds, "tokens_per_s": generated / max(seconds, 1e-9)}


if __name__ == "__main__":
    from jobs.cli import run_cli

    run_cli(main, sys.argv[1:], prog="aerie regenerate")
