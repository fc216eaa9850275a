"""The Hugging Face hub: what a repo holds, decided from its file list, then only what loading needs.

A hub id loads like the directory of its snapshot: every layout with safetensors
loads directly through `Model.sanitize`; PyTorch pickles need `convert`.
"""

from __future__ import annotations

from pathlib import Path

from .errors import FastVLMError
from .fastvlm import COREML_EXPORT

TEXT_PATTERNS = ["*.json", "merges.txt"]  # config, shard index, tokenizer, preprocessor
PICKLE_SUFFIXES = (".bin", ".pt")


def _unreachable(repo_id: str, e: Exception) -> FastVLMError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return FastVLMError(
        f"cannot fetch {repo_id} from the Hugging Face hub ({reason}); "
        "check the network or pass --model PATH to a local checkpoint"
    )


def repo_files(repo_id: str, revision: str | None = None) -> list[str]:
    """The repo's file paths: from the hub, or, offline, from the snapshot in the local cache."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return HfApi().list_repo_files(repo_id, revision=revision)
    except HFValidationError as e:
        raise FastVLMError(f"{repo_id!r} is not a usable hub id: {str(e).splitlines()[0]}") from None
    except Exception as online:  # offline, no network, unknown repo: the cache may still hold it
        try:
            path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:
            raise _unreachable(repo_id, online) from None
        return [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]


def fetch(repo_id: str, revision: str | None = None, pickles: bool = False) -> Path:
    """Download what loading (or, with `pickles`, converting) a repo needs; refuse, before any
    weight is downloaded, a repo whose vision tower is a CoreML model."""
    from huggingface_hub import snapshot_download

    files = repo_files(repo_id, revision)
    if any(".mlpackage" in f for f in files):
        raise FastVLMError(f"{repo_id}: {COREML_EXPORT}")
    patterns = list(TEXT_PATTERNS)
    if any(f.endswith(".safetensors") for f in files):
        patterns.append("*.safetensors")
    elif pickles and any(f.endswith(PICKLE_SUFFIXES) for f in files):
        patterns += [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
    elif any(f.endswith(PICKLE_SUFFIXES) for f in files):
        raise FastVLMError(f"{repo_id} holds PyTorch weights only: convert it first "
                           f"(fastvlm-mlx convert {repo_id} --out DIR) and pass --model DIR")
    else:
        raise FastVLMError(f"{repo_id} holds no weights (*.safetensors, *.bin or *.pt)")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # huggingface_hub's HTTP, offline and disk errors
        raise _unreachable(repo_id, e) from None
