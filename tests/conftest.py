import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run in Triton's interpreter; it must be on before
# fedlr.kernels.lora_triton is imported (its @triton.jit reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _a_sessions_own_epsilon_cache(tmp_path_factory):
    """Tests neither read nor fill the user's epsilon cache: the accountants' values are
    computed afresh in each session (subprocesses and Ray workers inherit the variable)."""
    from fedlr.privacy.epsilon_cache import CACHE_DIR_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("epsilon-cache")))
        yield
