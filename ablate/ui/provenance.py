"""Where a run's code and data came from, in MLflow's own terms: the source tags (shown in the Source and
Version columns) and dataset inputs (the Dataset column, with train/val contexts)."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Mapping

from ablate import track
from ablate.errors import redact_url

SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_TYPE_TAG = "mlflow.source.type"
GIT_COMMIT_SOURCE_TAG = "mlflow.source.git.commit"
GIT_BRANCH_TAG = "mlflow.source.git.branch"
GIT_REPO_URL_TAG = "mlflow.source.git.repoURL"
GIT_DIRTY_TAG = "mlflow.source.git.dirty"
#: Input tag of a dataset input: which part of training it fed.
DATASET_CONTEXT_TAG = "mlflow.data.context"
TRAIN_CONTEXT, VAL_CONTEXT = "train", "val"
#: Where a dataset input says its data came from: the toolkit's own loaders (ablate.data).
DATASET_SOURCE = {"tags": {SOURCE_NAME_TAG: "ablate.data"}}


def _git(*args: str) -> str | None:
    """Output of a local git command in the package's checkout, or None (not a checkout, no git)."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


@functools.lru_cache(maxsize=None)
def _git_tags() -> tuple[tuple[str, str], ...]:
    commit = track.git_commit()
    if commit == "unknown":
        return ()
    tags = {GIT_COMMIT_SOURCE_TAG: commit.removesuffix("-dirty"), GIT_DIRTY_TAG: str(commit.endswith("-dirty")).lower()}
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags[GIT_BRANCH_TAG] = branch
    remote = _git("remote", "get-url", "origin")  # local config only: nothing is fetched
    if remote:
        tags[GIT_REPO_URL_TAG] = redact_url(remote)
    return tuple(tags.items())


def source_tags(entry_point: str = "ablate") -> dict[str, str]:
    """MLflow's source tags: ``entry_point`` as the source name, type LOCAL, and the commit, branch, remote and
    dirty flag of the checkout the code runs from (none of those outside a checkout)."""
    return {SOURCE_NAME_TAG: entry_point, SOURCE_TYPE_TAG: "LOCAL", **dict(_git_tags())}


def config_digest(values: Mapping[str, Any]) -> str:
    """An 8-character digest of the settings that define a dataset (name, size, noise, split...)."""
    text = json.dumps(dict(values), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def log_dataset_inputs(client, run_id: str, dataset_name: str, digest: str, n_train: int, n_val: int) -> None:
    """Log the run's training and validation sets as MLflow dataset inputs (contexts ``train`` and ``val``).

    Each split is its own dataset (MLflow keeps one input per dataset and run), named ``dataset_name``, its
    digest derived from ``digest`` and the split, its size in the profile (``num_rows``)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for context, rows in ((TRAIN_CONTEXT, n_train), (VAL_CONTEXT, n_val)):
        split_digest = hashlib.sha256(f"{digest}/{context}".encode("utf-8")).hexdigest()[:8]
        dataset = Dataset(name=dataset_name, digest=split_digest, source_type="code",
                          source=json.dumps(DATASET_SOURCE),
                          profile=json.dumps({"num_rows": int(rows), "digest": digest, "split": context}))
        inputs.append(DatasetInput(dataset, [InputTag(DATASET_CONTEXT_TAG, context)]))
    client.log_inputs(run_id, datasets=inputs)
