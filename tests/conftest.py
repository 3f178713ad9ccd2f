import os

# No machine here reaches a model hub: fail fast instead of retrying for ~30 s a lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

THREADS = min(2, os.cpu_count() or 1)
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _same_thread_count_for_every_test():
    """A Trainer sets torch's thread count for its process (also in module-scoped fixtures, which
    run before this one): every test starts with the suite's count, so results compared against
    stored numbers (tests/fixtures) do not depend on which tests ran before."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture
def registry():
    from radio_core.registry import get_registry

    return get_registry()


def _checkout_leftovers() -> set[str] | None:
    """Untracked and ignored files of the checkout (git), except caches and the venv."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "--others", "--directory", "--no-empty-directory"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    skip = ("__pycache__", ".pytest_cache", ".venv", "venv")
    return {p for p in out.stdout.splitlines() if not any(part in skip for part in Path(p).parts)}


@pytest.fixture(scope="session", autouse=True)
def _tests_leave_no_files_in_the_checkout():
    """Tests write only to temp dirs: any file a test session adds to the checkout is an error."""
    before = _checkout_leftovers()
    yield
    after = _checkout_leftovers()
    if before is not None and after is not None and after - before:
        raise AssertionError(f"tests left files in the checkout: {sorted(after - before)[:10]}")
