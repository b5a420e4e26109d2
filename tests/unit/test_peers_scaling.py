"""bench.peers' scaling figures: each target at every concurrency over itself at the lowest one."""

from bench.peers import scaling


def _point(tok_s: float, ttft: float) -> dict:
    return {"output_tok_s": tok_s, "ttft_p50_ms": ttft}


def test_each_concurrency_over_the_lowest_per_target():
    results = {"switchyard-mamba": {1: _point(100.0, 20.0), 4: _point(300.0, 30.0), 16: _point(520.0, 70.0)},
               "vllm": {4: _point(60.0, 1000.0), 16: _point(90.0, 3000.0)},
               "switchyard-hf": {}}
    assert scaling(results) == {
        "switchyard-mamba": {4: {"throughput": 3.0, "ttft_p50": 1.5}, 16: {"throughput": 5.2, "ttft_p50": 3.5}},
        "vllm": {16: {"throughput": 1.5, "ttft_p50": 3.0}},
    }
