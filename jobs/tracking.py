"""MLflow tracking: one run per job, created by the driver; rank 0 logs step metrics into it; a null tracker
elsewhere. Side effects live here and nowhere else."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

# Fail fast on an unreachable server instead of retrying for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class NullTracker:
    """What non-zero ranks get: every call is a no-op."""

    run_id = ""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def start_system_metrics(self, node_id: str, interval_s: float) -> None:
        pass

    def stop_system_metrics(self) -> None:
        pass


class MlflowTracker(NullTracker):
    """Logs into one MLflow run through the client API (no global active-run state)."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri, self.run_id = uri, run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # A resumed run keeps its first params (MLflow forbids changing them); changes become tags.
        existing = self.client.get_run(self.run_id).data.params
        changed = {k: f"{existing[k]} -> {v}" for k, v in params.items() if k in existing and existing[k] != str(v)}
        self.set_tags({f"changed_on_resume.{k}": v for k, v in changed.items()})
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def register_draft(self, name: str, artifact_path: str = "draft") -> str:
        """Register the logged draft folder as a new version of registered model `name`; returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        return self.client.create_model_version(name, source=source, run_id=self.run_id).version

    def start_system_metrics(self, node_id: str, interval_s: float) -> None:
        """CPU/GPU/memory of this process's node into the run (system/<node_id>/...)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if interval_s <= 0:
            return
        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=True,
                                             node_id=node_id, tracking_uri=self.uri)
        self._monitor.start()

    def stop_system_metrics(self) -> None:
        if getattr(self, "_monitor", None) is not None:
            self._monitor.finish()
            self._monitor = None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI (None for servers and other stores)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _create_schema(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # runs MLflow's migrations


def ensure_sqlite_store(uri: str) -> None:
    """Create an embedded sqlite store atomically: MLflow's schema migrations run in a side file that is renamed into
    place only when complete, so a run interrupted in its first seconds cannot leave a half-migrated DB that breaks
    every later run of that name."""
    path = sqlite_path(uri)
    if path is None or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name every time: MLflow caches stores per URI, and a cached one would skip the migrations.
    tmp = path.with_name(f".{path.name}.init-{uuid.uuid4().hex[:12]}")
    try:
        _create_schema(f"sqlite:///{tmp}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


TRAIN_URI_FIX = "start the server or pass --set tracking.uri=... (empty = embedded sqlite store in the run folder)"


def check_store(uri: str, unreachable_fix: str = TRAIN_URI_FIX):
    """An MlflowClient for `uri` after checking it answers (and creating an embedded store atomically); raises a
    clear error at once if it is unreachable (ending with `unreachable_fix`, which names the caller's own flag) or
    damaged. Creates no run: call before validating the inputs."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    try:
        ensure_sqlite_store(uri)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any transport error means: unreachable
        why = " ".join(str(err).split())[:160]
        if db is not None and not any(w in str(err).lower() for w in ("not a database", "malformed", "alembic",
                                                                      "migration", "no such table", "revision")):
            raise RuntimeError(
                f"the embedded MLflow store {db} cannot be opened ({type(err).__name__}: {why}); check that the "
                f"folder is writable and that no other process holds the file, or pass --set tracking.uri=..."
            ) from err
        if db is not None:
            raise RuntimeError(
                f"the embedded MLflow store {db} cannot be opened ({type(err).__name__}: {why}); it is "
                f"damaged (e.g. written by an older MLflow, or by a run killed while creating it): move it away (its "
                f"metrics are lost) or choose another run name / --set tracking.uri=..."
            ) from err
        raise ConnectionError(
            f"MLflow tracking URI {uri!r} is unreachable ({type(err).__name__}: {str(err)[:200]}); {unreachable_fix}"
        ) from err
    return client


def brief_error(err: BaseException, limit: int = 200) -> str:
    """'Type: message' on one line, cut at `limit` characters: for errors quoted inside a longer message."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"


def probe_store(uri: str) -> str:
    """Why `uri` cannot be reached from this process ('' if it can). Run on the nodes a trainer may land on: the
    driver's check_store has created an embedded store, so a missing sqlite file means another node's disk.

    A tracking server is asked over plain HTTP (one request, 10 s; MLflow's client takes seconds to import) with the
    credentials MLflow would send from this node (MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD)."""
    import base64
    import json
    import urllib.error
    import urllib.request

    db = sqlite_path(uri)
    if db is not None:
        return "" if db.exists() else f"the sqlite file {db} does not exist on this node (an embedded store lives on " \
                                      f"the driver's disk)"
    if not uri.startswith(("http://", "https://")):
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - any transport error means: unreachable from here
            return brief_error(err)
        return ""
    req = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                                 data=json.dumps({"max_results": 1}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        req.add_header("Authorization", f"Basic {base64.b64encode(pair.encode()).decode()}")
    try:
        with urllib.request.urlopen(req, timeout=10):
            return ""
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return (f"HTTP {err.code}: the server wants credentials; set MLFLOW_TRACKING_USERNAME/_PASSWORD or "
                    f"MLFLOW_TRACKING_TOKEN on every node")
        return f"HTTP {err.code} {err.reason}"
    except Exception as err:  # noqa: BLE001 - refused, timed out, no route, DNS
        return brief_error(err)


def open_run(uri: str, experiment: str, run_name: str, *, run_id: str | None = None,
             artifact_root: Path | None = None, fresh: bool = False,
             unreachable_fix: str = TRAIN_URI_FIX) -> MlflowTracker:
    """Create or resume an MLflow run, status RUNNING: `run_id` resumes that run (a new one if it is gone);
    otherwise `fresh` creates a new run, and the default resumes the newest run named `run_name`.

    `artifact_root`: where a NEW experiment keeps its artifacts; for a sqlite store by default `artifacts/` next to
    the database (MLflow's default is ./mlruns of the current directory, which `ray job submit` deletes; a tracking
    server keeps its own default). `fresh`: always a new run. Raises at once if `uri` is unreachable (see
    check_store)."""
    client = check_store(uri, unreachable_fix)
    db = sqlite_path(uri)
    if artifact_root is None and db is not None:
        artifact_root = db.parent / "artifacts"
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        exp_id = client.create_experiment(experiment, artifact_location=artifact_root.absolute().as_uri()
                                          if artifact_root is not None else None)
    if run_id is not None:
        try:
            found = client.get_run(run_id)
            runs = [found] if found.info.lifecycle_stage == "active" else []
        except Exception:  # noqa: BLE001 - deleted or from another store: start a new run
            runs = []
    else:
        runs = [] if fresh else client.search_runs(
            [exp_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'", max_results=1,
            order_by=["attribute.start_time DESC"])
    run_id = runs[0].info.run_id if runs else client.create_run(exp_id, run_name=run_name).info.run_id
    if runs:
        client.update_run(run_id, status="RUNNING")
    return MlflowTracker(uri, run_id)


def close_run(tracker: MlflowTracker, status: str, error: BaseException | None = None) -> None:
    """End the run as FINISHED, FAILED or KILLED; a failure's type and message go into the `error` tag."""
    if error is not None:
        msg = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        tracker.set_tags({"error": msg[:4900]})
    tracker.client.set_terminated(tracker.run_id, status)


def metric_history(tracker: MlflowTracker, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric, latest value per step (a resumed run logs some steps twice)."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in tracker.client.get_metric_history(tracker.run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return sorted((s, v) for s, (_, v) in by_step.items())


def plot_ttt_curves(tracker: MlflowTracker, ttt_length: int, out_png: Path) -> Path:
    """PNG: loss and accuracy per TTT step over training, from the run's own metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k in range(ttt_length):
        for ax, key in zip(axes, (f"loss_{k}", f"acc_{k}")):
            hist = metric_history(tracker, key)
            if hist:
                ax.plot(*zip(*hist), label=f"step {k}", color=plt.cm.viridis(k / max(ttt_length - 1, 1)))
    axes[0].set(title="TTT loss per step", xlabel="optimizer step", ylabel="soft CE")
    axes[1].set(title="TTT accuracy per step (draft argmax = target argmax)", xlabel="optimizer step", ylim=(0, 1))
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def log_files(tracker: NullTracker, files: dict[str, str], artifact_path: str | None = None) -> None:
    """Log small text files (name → content) as artifacts."""
    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            (Path(d) / name).write_text(text)
        tracker.log_artifacts(d, artifact_path)
