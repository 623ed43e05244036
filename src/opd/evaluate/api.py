"""`opd.evaluate(...)`: `opd eval` as one Python call, returning the results dict that results.json holds.

The same path as the command: EvalSettings checks the sampling settings, evaluate/run.py the benchmarks,
graders and responses, before anything is sampled; the errors are the command's (ValueError subclasses
whose message names the argument).
"""

from __future__ import annotations

import os

from opd.evaluate.benchmarks import DEFAULT_BENCHMARKS
from opd.evaluate.run import EvalSettings, evaluate
from opd.evaluate.sampling import EvalBackend


def evaluate_model(
    model_dir: str | os.PathLike | None = None,
    benchmarks: list[str] | tuple[str, ...] = DEFAULT_BENCHMARKS,
    *,
    samples: int = 1,
    temperature: float = 1.0,  # 0: greedy (then samples must be 1)
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    limit: int | None = None,  # the first M problems of each benchmark
    batch_size: int = 16,
    chat_template_kwargs: dict | None = None,
    output_dir: str = "runs/eval",
    backend: str = "hf",  # hf | vllm | server (with `server`)
    server: str | None = None,
    responses: str | None = None,  # grade this JSONL of responses instead of sampling (model_dir None)
    partial: bool = False,
    grader: str | None = None,  # a custom grader for benchmark files (module:function or a registered name)
    **backend_options,  # EvalBackend's: dtype, kv_cache_gib, max_model_len, seed
) -> dict:
    """Sample (or grade `responses` for) `benchmarks` with the model at `model_dir`; writes
    `<output_dir>/results.json` and returns the same dict: per benchmark avg@k, pass@k and every sample."""
    if (model_dir is None) == (responses is None):
        raise ValueError("opd.evaluate: give model_dir or responses (one of the two)")
    if isinstance(benchmarks, str):  # a lone name would be read letter by letter
        benchmarks = [benchmarks]
    if responses is not None and len(benchmarks) != 1:
        raise ValueError(f"opd.evaluate: responses answer one benchmark, got {list(benchmarks)}")
    settings = EvalSettings(samples=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            limit=limit, batch_size=batch_size, chat_template_kwargs=dict(chat_template_kwargs or {}))
    sampler = None
    if responses is None:
        sampler = EvalBackend(name="server" if server else backend, server=server, **backend_options)
    # Paths as text: results.json records them (opd.train returns a Path)
    return evaluate([str(name) for name in benchmarks], settings, str(output_dir),
                    model_dir=None if model_dir is None else str(model_dir),
                    responses_path=None if responses is None else str(responses), partial=partial, backend=sampler,
                    grader=grader)
