import os

import pytest
import torch

# One thread per test process: pytest-xdist runs two, and oversubscribed cores stall (APIS.md §6).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_args():
    from mm_llama.model import LlamaArgs

    return LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32,
                     ffn_dim_multiplier=1.3, use_scaled_rope=True, rope_original_context=16, max_seq_len=256)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo text set (`mm-llama data demo`), written once per test process."""
    from mm_llama.data.demo import write_demo

    out = tmp_path_factory.mktemp("demo")
    write_demo(out, modalities=["text"])
    return out
