"""Where recllm keeps things: its data home, the bundled data, prompts, adapters and model caches."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent


def home() -> Path:
    """The data home: `$RECLLM_HOME`, else the user's data dir (`$XDG_DATA_HOME/recllm`)."""
    env = os.environ.get("RECLLM_HOME")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        path = Path(base) / "recllm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def bundled_dir() -> Path:
    """The MovieLens ml-latest-small copy shipped inside the package."""
    return PACKAGE_DIR / "data" / "ml-latest-small"


def prompts_dir() -> Path:
    """Prompt templates: `$RECLLM_PROMPTS`, else `prompts/` next to the package (shipped with it)."""
    env = os.environ.get("RECLLM_PROMPTS")
    if env:
        return Path(env)
    for candidate in (PROJECT_DIR / "prompts", PACKAGE_DIR / "prompts"):
        if candidate.is_dir():
            return candidate
    return PROJECT_DIR / "prompts"


def adapters_dir() -> Path:
    """Shipped LoRA adapters (`adapters/` at the project top level)."""
    for candidate in (PROJECT_DIR / "adapters", PACKAGE_DIR / "adapters"):
        if candidate.is_dir():
            return candidate
    return PROJECT_DIR / "adapters"


def models_cache_dir() -> Path:
    """Converted model weights: `$RECLLM_MODELS_CACHE`, else `<home>/models`."""
    env = os.environ.get("RECLLM_MODELS_CACHE")
    path = Path(env).expanduser() if env else home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def retrievers_dir() -> Path:
    """Fitted collaborative retrievers, one folder per catalog."""
    path = home() / "retrievers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def temp_sibling(target: Path) -> Path:
    """A new empty folder `.<name>.tmp-<pid>-<random>` beside `target`, to be renamed onto it when complete.

    Such folders left by processes that no longer run (killed mid-write) are removed first; a live process's
    folder is never touched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        pid = stale.name[len(f".{target.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # not mkdtemp: the folder gets the usual permissions (umask), as a plain mkdir would
    return tmp


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def replace_dir(target: Path, build, *, keep: str | None = None) -> Path:
    """Write the folder `target` atomically: `build(tmp)` fills a temporary sibling, which is then renamed to
    `target` (an existing `target` is replaced). A process killed at any point leaves the old folder or the
    new one complete, never a partial one (or, killed between the two renames of a replacement, none).

    `keep`: the name of a file only a complete folder holds. When `target` has it by the time the new folder
    is built (another process built the same thing meanwhile, e.g. a converted-model cache), that folder is
    kept and the new one dropped, so a folder others may be reading is never swapped under them.
    """
    target = Path(target)
    tmp = temp_sibling(target)
    old = None
    try:
        build(tmp)
        if keep is not None and (target / keep).is_file():
            return target
        if target.exists():
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its folder in between
            if keep is None or not (target / keep).is_file():
                raise
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)  # put the previous folder back
            old = None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target
