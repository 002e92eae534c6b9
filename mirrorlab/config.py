"""Typed, validated configuration for every mirrorlab command.

One root `Config` with a section per component (model, task, divergence, train, search,
tracking, compare). Every section forbids unknown keys, so a typo fails loudly with the
field path and the allowed keys. YAML files are merged with `--set a.b=c` overrides
(values parsed as YAML scalars) before validation.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from mirrorlab import divergences, rollouts, strategies, tasks
from mirrorlab.evaluators import evaluators
from mirrorlab.executors import executors
from mirrorlab.registry import Registry
from mirrorlab.spaces import spaces


class ConfigError(ValueError):
    """A configuration problem; the message names the field and what is allowed."""


class Section(BaseModel):
    """Base for all config sections: unknown keys are errors, assignments are validated.

    `renamed` maps old field names to new ones: an old name is still accepted, with a
    DeprecationWarning naming the new one (both at once is an error)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data: Any) -> Any:
        if not cls.renamed or not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in cls.renamed.items():
            if old in data:
                if new in data:
                    raise ValueError(f"{old} is the deprecated name of {new}; set only {new}")
                warnings.warn(f"config field {old!r} is deprecated; use {new!r}", DeprecationWarning,
                              stacklevel=2)
                data[new] = data.pop(old)
        return data


def registered(registry: Registry[Any], paths: bool = False, also: tuple[str, ...] = ()) -> AfterValidator:
    """A field validator: the value must be a name in `registry` or in `also` (the error lists the
    allowed names), or, with `paths`, a `package.module:factory` import path."""

    def check(name: str) -> str:
        if name in registry or name in also or (paths and ":" in name):
            return name
        extra = " or package.module:factory" if paths else ""
        allowed = ", ".join(registry.names() + list(also))
        raise ValueError(f"unknown {registry.kind} {name!r}; allowed: {allowed}{extra}")

    return AfterValidator(check)


DivergenceName = Annotated[str, registered(divergences.registry)]
TaskName = Annotated[str, registered(tasks.registry)]
StrategyName = Annotated[str, registered(strategies.registry)]
SpaceKind = Annotated[str, registered(spaces)]
ExecutorKind = Annotated[str, registered(executors)]
EvaluatorKind = Annotated[str, registered(evaluators, paths=True)]
BackendName = Annotated[str, registered(rollouts.backends, also=("auto",))]


# --------------------------------------------------------------------------- model
class LoraConfig(Section):
    """LoRA adapter settings (peft). The reference policy is the base with the adapter off."""

    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names that get adapters, or all-linear")
    top_layers: int | None = Field(
        None, ge=1, description="adapt only the last N transformer layers (None: all); the backward pass "
        "then stops at the lowest adapted layer, so a step costs less (the real testbed's setting)")


class ModelConfig(Section):
    """Which causal LM to train: a preset (`tiny`, `tiny-scratchpad`, `smollm2-135m`), a hub name
    or a local path."""

    name: str = Field(
        "tiny", description="a preset (tiny, tiny-scratchpad, smollm2-135m), a hub model name or a local "
        "directory")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="parameter dtype of the policy (and reference)")
    device: str = Field("auto", description="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    lora: LoraConfig | None = Field(
        None, description="train a LoRA adapter instead of all weights (the reference is the base with the "
        "adapter off)")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, more compute)")
    cache_dir: str | None = Field(
        None, description="where presets are built and cached (default ~/.cache/mirrorlab)")


# --------------------------------------------------------------------------- task
class TaskConfig(Section):
    """A registered task by name, with the keyword parameters its constructor takes."""

    name: TaskName = Field(
        "arithmetic", description="registered task (arithmetic, gsm8k, mbpp or a plugin's)")
    params: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the task's constructor (splits, sizes, "
        "levels, data_dir, ...)")


# --------------------------------------------------------------------------- divergence
class DivergenceConfig(Section):
    """The regulariser: a registered divergence, its estimator and its coefficient lambda.

    For `neural`, `map` may name a saved map (a .safetensors file or `models:/NAME@ALIAS`);
    otherwise `params` are passed to the divergence factory (e.g. `seed`, `scale`).
    """

    name: DivergenceName = Field("kl_k3", description="registered divergence (the regulariser D)")
    coef: float = Field(
        0.04, ge=0, description="lambda, the regulariser's coefficient (0 turns it off); a saved mixture "
        "map's own searched lambda wins")
    estimator: Literal["sampled", "topk", "full"] = Field(
        "sampled", description="sampled: D at the sampled tokens (the paper's); topk: exact over the "
        "reference's topk most likely tokens plus one bucket for the rest; full: exact, summed over the "
        "vocabulary (docs/estimators.md)")
    topk: int = Field(32, ge=1, description="K of the topk estimator (the reference's K most likely tokens)")
    chunk_size: int = Field(
        8192, ge=1, description="vocabulary entries per chunk of the full estimator (memory bound)")
    params: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the divergence factory (e.g. seed, scale "
        "for neural; weight for mixture)")
    map: str | None = Field(
        None, description="a saved map: .safetensors / .json file, a map directory, models:/NAME@ALIAS or "
        "runs:/ID/PATH (wins over name + params)")
    compile: bool = Field(
        False, description="torch.compile the sampled estimator (fuses about a hundred small kernels of "
        "neural; worth it on GPUs)")
    anchor: Literal["ref", "lagged"] = Field(
        "ref", description="the policy D is measured from: ref (the frozen starting model, the paper's) or "
        "lagged (the policy itself, re-copied every anchor_every steps: the periodic reference reset of "
        "prolonged RL runs; costs one more copy of the trainable weights). See docs/estimators.md")
    anchor_every: int = Field(
        50, ge=1, description="steps between re-anchoring with anchor: lagged (1: D = 0 at every step)")
    placement: Literal["loss", "reward"] = Field(
        "loss", description="where lambda x D acts: loss (added to the per-token loss, gradients flow "
        "through D) or reward (the sampled tokens' D, detached, summed over the completion and subtracted "
        "from each sequence's reward before the group advantage, as verl's use_kl_in_reward; needs "
        "estimator sampled). See docs/estimators.md")

    @model_validator(mode="after")
    def _placement_fits(self) -> DivergenceConfig:
        if self.placement == "reward" and self.estimator != "sampled":
            raise ValueError("placement reward penalises the sampled tokens' D: set estimator=sampled "
                             "(or placement=loss for the full estimator)")
        return self


# --------------------------------------------------------------------------- inner loop
class GenerationConfig(Section):
    """Sampling of the G completions per prompt."""

    num_generations: int = Field(
        8, ge=2, description="G, completions sampled per prompt (the group of the advantage)")
    max_new_tokens: int = Field(32, ge=1, description="completion budget; also dr_grpo's length normaliser")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling threshold (1 = off)")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 = off)")
    min_new_tokens: int = Field(
        0, ge=0, description="stop tokens are suppressed before this many tokens (benchmarks of fixed "
        "length)")
    backend: BackendName = Field(
        "fast", description="fast: mirrorlab's lean KV-cached sampler (same distribution, prompt prefilled "
        "once per group); hf: transformers' generate; vllm: a colocated vLLM engine in this process "
        "(built once, weights pushed in memory after optimiser steps; needs vLLM installed, see "
        "docs/architecture.md); auto: vllm where vLLM is installed and the model has >= 50M parameters "
        "(where it measured faster), else fast; or a backend registered in mirrorlab.rollouts.backends")
    cuda_graph: bool = Field(
        True, description="fast backend on CUDA: replay each decode step as one captured CUDA graph "
        "(ignored on CPU)")
    vllm_is_cap: float | None = Field(
        2.0, ge=1.0, description="vllm backend: cap C of the truncated importance weight min(exp(trainer "
        "log-prob - engine log-prob), C) that multiplies each token's loss (None: no correction)")
    vllm_dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        "bfloat16", description="vllm backend: the engine's weight dtype (auto: the checkpoint's)")
    vllm_kv_cache_mb: int = Field(
        256, ge=16, description="vllm backend: memory reserved for the engine's KV cache, MiB")


class OptimConfig(Section):
    """AdamW with linear warm-up then a constant or cosine schedule."""

    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up over this many optimiser steps")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: constant or cosine decay to 0")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the gradient norm to this (None: no clipping)")


class CompletionLogConfig(Section):
    """A small sample of completions logged to MLflow as tables (`completions/step_XXXX.json`,
    `completions/eval_<split>.json`): n rows of (prompt, completion, reward, score, length) at the
    first and last training step (plus every `every` steps) and at the run's evaluation."""

    n: int = Field(8, ge=0, le=64, description="completions per table (rows evenly spaced over the batch); 0 "
                   "turns completion logging off")
    every: int = Field(0, ge=0, description="also log a table every this many steps (0: only the first and "
                       "last step)")
    max_chars: int = Field(400, ge=16, le=4000, description="prompt and completion texts are cut to this "
                           "many characters")


class TrainConfig(Section):
    """One GBMPO run (DESIGN section 3)."""

    renamed: ClassVar[dict[str, str]] = {"reg_is_weight": "reg_times_ratio"}

    steps: int = Field(100, ge=0, description="GBMPO steps (each: one generated batch, mu optimiser passes)")
    prompts_per_step: int = Field(
        4, ge=1, description="prompts per generated batch (batch = prompts_per_step x num_generations "
        "completions)")
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig, description="sampling of the completions")
    advantage: Literal["grpo", "dr_grpo"] = Field(
        "dr_grpo", description="grpo: (r - mean) / (std + 1e-4) per group; dr_grpo: r - mean only")
    loss_type: Literal["grpo", "dr_grpo", "bnpo", "dapo"] = Field(
        "dr_grpo", description="aggregation: grpo (per-sequence token mean), dr_grpo (sum / (B x "
        "max_new_tokens)), bnpo (token mean per micro-batch), dapo (token mean over the batch)")
    epsilon_low: float = Field(0.2, ge=0, description="PPO clip range below 1")
    epsilon_high: float = Field(
        0.2, ge=0, description="PPO clip range above 1 (DAPO's clip-higher when larger)")
    mu: int = Field(
        1, ge=1, description="optimisation passes per generated batch (TRL's num_iterations, GRPO's mu); > "
        "1 uses the sampling log-probs as the old policy")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="matmul precision of the inner loop: bfloat16 runs the policy and reference "
        "forwards/backward under bf16 autocast (fp32 weights, optimiser state, log-softmax and loss) and "
        "decodes with prepacked bf16 weights; auto: bfloat16 on a CPU with AMX or AVX512-BF16 (2-5x "
        "faster matmuls there), float32 elsewhere (AVX2-only CPUs, where bf16 is slower, and CUDA)")
    share_trunk: bool = Field(
        True, description="LoRA on the top layers only (model.lora.top_layers): run the frozen layers "
        "below once per batch and reuse their output for the reference and every optimisation pass "
        "(the same logits bit for bit; benchmarks/trunk_share.py); False runs every forward in full")
    micro_batch_size: int | None = Field(
        None, ge=1, description="completions per forward/backward (None: the whole batch); the loss is the "
        "same")
    mask_truncated: bool = Field(
        False, description="drop completions that hit max_new_tokens from the loss (DAPO's overlong "
        "filtering)")
    reg_times_ratio: bool = Field(
        False, description="multiply D by the differentiable ratio rho (TRL 1.16's use_bias_correction_kl, "
        "its default); False is the classic GRPO / GBMPO form. Was `reg_is_weight` (accepted, deprecated)")
    eval_every: int = Field(
        0, ge=0, description="evaluate on eval_split every this many steps during training (0: only at the "
        "end)")
    eval_split: Literal["train", "val", "test"] = Field("val", description="split of the periodic evaluation")
    eval_size: int | None = Field(None, ge=1, description="problems of the periodic evaluation (None: all)")
    eval_max_new_tokens: int | None = Field(
        None, ge=1, description="completion budget of greedy evaluation (None: generation.max_new_tokens)")
    max_reward_error_rate: float = Field(
        0.05, ge=0.0, le=1.0, description="an evaluation in which the task could not judge more than "
        "this fraction of completions (MBPP: the sandbox's harness failed to start, was killed before "
        "it reported, or its report is malformed) fails with the count and the first reason; below "
        "it, those completions are left out of the metric and counted as reward_errors")
    require_active_regulariser: bool = Field(
        False, description="stop a run whose regulariser is numerically absent (lambda * D too small to "
        "move the policy, a detached or clamped D; checked at step 0 and every grad_ratio_every steps) "
        "instead of warning once")
    grad_ratio_every: int = Field(
        10, ge=0, description="measure the regulariser-to-PG gradient-norm ratio every k steps (one extra "
        "backward of D on those steps; 0: never)")
    log_completions: CompletionLogConfig = Field(
        default_factory=CompletionLogConfig, description="a bounded sample of completions per run, logged "
        "to MLflow as tables")
    seed: int = Field(
        0, description="seed of the run (prompt order, sampling, initialisation of any new weights)")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="the optimiser and its schedule")


# --------------------------------------------------------------------------- search
class SpaceConfig(Section):
    """What the search optimises: `neural` (380-dim softplus theta of NeuralMirrorMap),
    `neural_raw` (the paper's raw parametrisation, map = |theta|), `neural_coef` (neural plus log
    lambda as a coordinate), `mixture`, or `coef` (log lambda alone for one fixed divergence)."""

    kind: SpaceKind = Field(
        "neural", description="registered search space (neural, neural_raw, mixture or a plugin's)")
    init: Literal["random", "zeros"] = Field(
        "random", description="random: the space's seeded random init (the paper's U[0, init_scale) for "
        "neural maps); zeros")
    init_scale: float = Field(0.01, gt=0, description="scale of the random init")
    coef_scale: float = Field(
        1.0, gt=0, description="spaces with a log-lambda coordinate (neural_coef, coef): sd of log lambda "
        "around log(divergence.coef) in the random init")
    params: dict[str, Any] = Field(
        default_factory=dict, description="space-specific settings: coef takes divergence (a registered "
        "name, default prob_l2) and divergence_params")


class StrategyConfig(Section):
    """A registered search strategy; `params` go to its constructor (e.g. sigma, lr, optimizer)."""

    name: StrategyName = Field(
        "openai_es", description="registered strategy (openai_es, gbmpo_es, nevergrad, random or a "
        "plugin's)")
    population: int = Field(8, ge=1, description="candidates per generation")
    generations: int = Field(2, ge=1, description="generations of the search")
    params: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the strategy (e.g. sigma, lr; optimizer "
        "for nevergrad); typos fail at load")

    @model_validator(mode="after")
    def _params_known(self) -> StrategyConfig:
        """Typos in `params` (and unknown nevergrad optimisers) fail at config time."""
        strategies.check_params(self.name, self.params)
        return self


class RacingConfig(Section):
    """Successive halving over inner seeds: every candidate is first scored on `min_seeds` seeds,
    then the best 1/`eta` of the survivors get `eta` times as many, up to `search.evaluator.seeds`.
    Candidates dropped at a rung keep the (noisier) fitness of the seeds they ran. With `steps`,
    the rungs are inner-run lengths instead (multi-fidelity: short runs first, on all seeds); the
    probe's `horizons` measure whether short runs rank maps as full runs do."""

    enabled: bool = Field(False, description="race candidates instead of giving each the full seed budget")
    eta: int = Field(2, ge=2, description="keep the best 1/eta of the candidates at each rung")
    min_seeds: int = Field(1, ge=1, description="inner seeds every candidate gets at the first rung")
    steps: list[int] = Field(
        default_factory=list, description="multi-fidelity racing instead: inner-step rungs (increasing, the "
        "last = search.evaluator.inner_steps); every candidate trains the first on all its seeds, the best "
        "1/eta are trained anew for the next")


class ConfirmConfig(Section):
    """The final confirmation stage: the `top_k` candidates of the whole search (by the incumbent
    rule) are re-scored on `seeds` fresh inner seeds the search never used; the best confirmed one
    is the search's answer and is registered with its confirmed fitness and standard error."""

    top_k: int = Field(0, ge=0, description="candidates re-scored at the end; 0 turns the stage off")
    seeds: int = Field(3, ge=1, description="fresh inner seeds per confirmed candidate")
    val_size: int | None = Field(None, ge=1, description="val problems per confirmation run (None: all)")


class EvaluatorConfig(Section):
    """How a candidate is scored: T inner steps on task.train, metric on task.val (DESIGN 5).

    `kind` is a registered evaluator (`gbmpo`, the real one; `analytic`, a cheap function of
    theta for debugging strategies) or a `package.module:factory` path; `params` go to it.
    Noise-aware fitness: `seeds` inner seeds per candidate (the same for every candidate of a
    generation: common random numbers), fitness paired against a `baseline` divergence trained on
    the same seeds (cached per seed), racing, an incumbent rule and a confirmation stage.
    """

    kind: EvaluatorKind = Field("gbmpo", description="registered evaluator name or package.module:factory")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the evaluator")
    seeds: int = Field(1, ge=1, description="inner seeds per candidate; fitness = mean over them")
    resample_each_generation: bool = Field(
        True, description="fresh seeds (and val subsets) each generation; False keeps one set for the search")
    baseline: DivergenceConfig | None = Field(
        None, description="paired fitness: subtract this divergence's fitness on the same seeds "
        "(trained once per seed and cached), e.g. {name: kl_k3, coef: 0.04}")
    inner_steps: int = Field(20, ge=0, description="GBMPO steps of each inner run")
    val_size: int | None = Field(None, ge=1, description="validation problems per inner run (None: all)")
    length_penalty: float = Field(0.0, ge=0, description="fitness -= this x mean completion length")
    failure_value: float = Field(-1.0, description="what the strategy is told for a FAILED candidate")
    timeout_s: float | None = Field(None, gt=0, description="wall-clock limit per inner run")
    reevaluate_incumbent: bool = Field(
        False, description="re-score the incumbent on every generation's seeds (running mean)")
    incumbent: Literal["mean", "lcb"] = Field(
        "mean", description="how the incumbent is chosen: best mean fitness, or best lower confidence "
        "bound mean - lcb_z x stderr (penalises lucky single draws)")
    lcb_z: float = Field(1.0, ge=0, description="z of the lower confidence bound (incumbent: lcb)")
    racing: RacingConfig = Field(default_factory=RacingConfig, description="successive halving over seeds")
    confirm: ConfirmConfig = Field(default_factory=ConfirmConfig, description="re-scoring on fresh seeds")

    @model_validator(mode="after")
    def _racing_fits(self) -> EvaluatorConfig:
        r = self.racing
        if r.steps:
            if not r.enabled:
                raise ValueError("racing.steps is set but racing.enabled is false: set racing.enabled=true "
                                 "(or remove racing.steps)")
            if any(b <= a for a, b in zip(r.steps, r.steps[1:], strict=False)) or min(r.steps) < 1 \
                    or r.steps[-1] != self.inner_steps:
                raise ValueError(
                    f"racing.steps ({r.steps}) must increase from >= 1 and end at inner_steps "
                    f"({self.inner_steps})")
        elif r.enabled and r.min_seeds >= self.seeds:
            raise ValueError(
                f"racing.min_seeds ({r.min_seeds}) must be < seeds ({self.seeds}) when racing is enabled: "
                "raise search.evaluator.seeds or set racing.enabled=false")
        bmap = self.baseline.map if self.baseline is not None else None
        if bmap is not None and bmap.startswith("search:"):
            raise ValueError("baseline.map: a search-relative map (search:...) cannot be the baseline; "
                             "use a file, a map directory or a models:/ URI")
        return self


class ExecutorConfig(Section):
    """Where candidates run: in process, one worker process per device, or Ray tasks."""

    kind: ExecutorKind = Field(
        "local", description="registered executor: local (in process), process (worker processes), ray "
        "(Ray actors)")
    workers: int = Field(1, ge=1, description="parallel workers (process, ray)")
    ray_address: str | None = Field(None, description="join this Ray cluster (None: start a local instance)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPU threads (process) or Ray CPUs per worker")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="Ray GPUs per worker (process: one device each by index)")


class SearchConfig(Section):
    """The outer loop (DESIGN section 5)."""

    space: SpaceConfig = Field(default_factory=SpaceConfig, description="what the search optimises")
    strategy: StrategyConfig = Field(default_factory=StrategyConfig, description="how it proposes candidates")
    evaluator: EvaluatorConfig = Field(
        default_factory=EvaluatorConfig, description="how a candidate is scored")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description="where candidates run")
    checkpoint_dir: str | None = Field(
        None, description="checkpoint and journals (default <output_dir>/<name>/search/checkpoint); search "
        "--resume continues from it")


# --------------------------------------------------------------------------- probe
class ProbeConfig(Section):
    """`mirrorlab probe`: the fitness landscape's signal and noise before any search. Points of the
    search space are scored on the same inner seeds (common random numbers) with the search's
    evaluator (`search.evaluator`: inner steps, baseline) and executor; see `mirrorlab.probe`."""

    points: int = Field(6, ge=1, description="random draws of the search space (besides its init x0)")
    draw: Literal["init", "perturb"] = Field(
        "init", description="init: independent draws of the space's random init (what `random` search "
        "tries); perturb: x0 + sigma * N(0, I) with the strategy's sigma (what one ES generation tries)")
    sigma: float | None = Field(
        None, gt=0, description="perturbation scale for draw: perturb (default: search.strategy.params."
        "sigma, else 0.5)")
    include_init: bool = Field(True, description="also score the space's init x0 (the search's start)")
    include_baseline: bool = Field(
        True, description="also score the paired baseline divergence (search.evaluator.baseline) as a point")
    seeds: int = Field(3, ge=2, description="inner seeds per point (the same for every point)")
    val_size: int | None = Field(
        None, ge=2, description="validation problems per evaluation (None: search.evaluator.val_size)")
    loglik: bool = Field(True, description="also measure the reference answer's mean log-likelihood")
    sample_k: int = Field(
        0, ge=0, description="also score k sampled completions per problem: expected reward and pass@k "
        "(0: off)")
    test_size: int = Field(
        0, ge=0, description="also score greedy accuracy on this many test problems, for each proxy's rank "
        "correlation with test accuracy on the other half of the seeds (0: off)")
    horizons: list[int] = Field(
        default_factory=list, description="also score val after these inner steps (< search.evaluator."
        "inner_steps) of the same run: the short-horizon check")
    differences: list[float] = Field(
        default_factory=lambda: [0.01, 0.02, 0.05],
        description="differences of fitness the plan sizes seeds for")
    val_multipliers: list[float] = Field(
        default_factory=lambda: [1.0, 5.0],
        description="validation-set sizes (x val_size) the plan considers")
    budgets: list[int] = Field(
        default_factory=lambda: [8, 16, 32],
        description="inner-run budgets the plan sizes best-of-n random for")
    power: float = Field(0.8, gt=0, lt=1, description="power of the plan's tests")
    alpha: float = Field(
        0.05, gt=0, lt=1, description="two-sided level of the plan's tests and the intervals")
    checkpoint_dir: str | None = Field(
        None, description="journal of finished jobs (default <output_dir>/<name>/probe); probe --resume "
        "continues from it")


# --------------------------------------------------------------------------- tracking
class TrackingConfig(Section):
    """MLflow: default is an embedded sqlite store in the working directory."""

    enabled: bool = Field(True, description="log to MLflow")
    tracking_uri: str | None = Field(
        None, description="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
        "working directory)")
    experiment: str | None = Field(None, description="MLflow experiment (default: the config's name)")
    register_as: str | None = Field(
        None, description="registered-model name of the best map (default <experiment>-map)")
    alias: str = Field("best", description="alias of the registered best map (models:/NAME@ALIAS)")
    plots: bool = Field(True, description="attach map plots to child runs")
    plot_scope: Literal["all", "incumbents"] = Field(
        "incumbents", description="which child runs get a map plot (~0.4 s of search-process CPU each): "
        "all, or each generation's new incumbent")


# --------------------------------------------------------------------------- compare
class MethodConfig(Section):
    """One arm of a comparison: a label and the divergence it trains with."""

    label: str = Field(description="the row's name in tables and MLflow")
    divergence: DivergenceConfig = Field(description="the regulariser this arm trains with")


START_LABEL = "untrained start"
# compare.baselines: standard -> these rows (fixed labels), after the untrained start and before the
# user's methods; each KL row at compare.baseline_coef (docs/estimators.md says why these four).
STANDARD_BASELINES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("lambda 0", {"name": "kl_k3", "coef": 0.0}),
    ("KL k1 in reward", {"name": "kl_k1", "placement": "reward"}),
    ("KL k2 in loss", {"name": "kl_k2", "placement": "loss"}),
    ("KL k3 in loss", {"name": "kl_k3", "placement": "loss"}),
)


def standard_baselines(coef: float = 0.04) -> list[MethodConfig]:
    """The rows `compare.baselines: standard` adds (after the untrained start): lambda = 0, k1 in
    the reward, k2 in the loss and k3 in the loss, the KL rows at `coef`."""
    out = []
    for label, d in STANDARD_BASELINES:
        d = {"coef": coef, **d}
        out.append(MethodConfig(label=label, divergence=DivergenceConfig(**d)))
    return out


class CompareConfig(Section):
    """Methods x seeds on the same settings; the first method (or `baseline`) is the baseline."""

    methods: list[MethodConfig] = Field(
        default_factory=list, description="the arms (empty: the single divergence section)")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2], description="training seeds; every arm runs on each (paired by "
        "seed)")
    baseline: str | None = Field(
        None, description="label of the baseline of the paired tests (default: the first row)")
    split: Literal["val", "test"] = Field("test", description="split every run is evaluated on")
    eval_size: int | None = Field(
        None, ge=1, description="problems evaluated per run (None: the whole split)")
    include_start: bool = Field(
        False, description="add an 'untrained start' row: the starting model evaluated without training "
        "(the limit of an infinitely strong regulariser), on the same split and seeds")
    baselines: Literal["none", "standard"] = Field(
        "none", description="standard: prepend the KL baselines a reviewer asks for, with fixed labels: "
        "the untrained start (include_start), 'lambda 0', 'KL k1 in reward', 'KL k2 in loss', 'KL k3 in "
        "loss' (the KL rows at baseline_coef); see docs/estimators.md")
    baseline_coef: float = Field(
        0.04, ge=0, description="lambda of the standard set's KL rows (0.04: DeepSeekMath's GRPO beta, TRL's "
        "old default and the quickstart's KL baseline)")
    workers: int = Field(
        1, ge=1, description="runs trained at once: 1 = in this process with `threads` threads; N > 1 = N "
        "worker processes with max(1, threads // N) threads each (tiny model, 60-step runs, 2-core AMD EPYC: "
        "2 x 1 thread 11 s per run vs 16 s for 1 x 2 threads; the last bits may differ from the "
        "in-process run's)")

    @property
    def start_row(self) -> bool:
        """Whether the untrained start is a row (include_start, or the standard baseline set)."""
        return self.include_start or self.baselines == "standard"

    @model_validator(mode="after")
    def _baseline_known(self) -> CompareConfig:
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method labels must be unique, got {labels}")
        if self.start_row and START_LABEL in labels:
            raise ValueError(f"method label {START_LABEL!r} is reserved for compare.include_start")
        if self.baselines == "standard":
            std = [lab for lab, _ in STANDARD_BASELINES]
            clash = sorted(set(std) & set(labels))
            if clash:
                raise ValueError(f"method labels {clash} are reserved for compare.baselines=standard; "
                                 "rename them")
            labels = [*std, *labels]
        if self.start_row:
            labels = [START_LABEL, *labels]
        if self.baseline is not None and self.baseline not in labels:
            raise ValueError(f"baseline {self.baseline!r} is not a method label; allowed: {labels}")
        return self


# --------------------------------------------------------------------------- root
class Config(Section):
    """The root configuration shared by all commands; each command reads the sections it needs."""

    name: str = Field(
        "mirrorlab", description="run name: results go to <output_dir>/<name>/<command>/, and it names the "
        "MLflow experiment")
    seed: int = Field(
        0, description="seed of the search (strategy, inner seeds) and of runs that do not set their own")
    output_dir: str = Field("runs", description="root of all results")
    threads: int = Field(
        2, ge=1, description="torch threads of the commands' own process (train, eval, compare, a local "
        "search); search workers use search.executor.cpus_per_worker. Fixed, not the machine's core count, "
        "so a run gives the same numbers on machines with other core counts (published numbers: 2)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the causal LM")
    task: TaskConfig = Field(default_factory=TaskConfig, description="the task and its splits")
    divergence: DivergenceConfig = Field(
        default_factory=DivergenceConfig, description="the regulariser of train / eval, and the search's "
        "base coefficient")
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="one GBMPO run (the inner loop of a search)")
    search: SearchConfig = Field(default_factory=SearchConfig, description="the outer loop")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow")
    compare: CompareConfig = Field(default_factory=CompareConfig, description="methods x seeds comparisons")
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="the landscape probe before a search")

    @model_validator(mode="after")
    def _tiny_format_matches_task(self) -> Config:
        """The tiny presets answer in one arithmetic format; the other would score 0 everywhere."""
        if self.task.name == "arithmetic" and self.model.name in ("tiny", "tiny-scratchpad"):
            want = self.model.name == "tiny-scratchpad"
            if bool(self.task.params.get("scratchpad", False)) != want:
                raise ValueError(
                    f"task.params.scratchpad: model.name={self.model.name} is trained on "
                    f"{'scratchpad' if want else 'bare-answer'} completions; set "
                    f"task.params.scratchpad={str(want).lower()} or use model.name="
                    f"{'tiny' if want else 'tiny-scratchpad'}")
        return self


# --------------------------------------------------------------------------- loading
def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the section at `loc` (the parent of an unknown key), if resolvable."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann = cur.model_fields[part].annotation
        args = getattr(ann, "__args__", None)
        if args:  # Optional[X] / list[X]: pick the BaseModel among the args
            ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        cur = ann
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return sorted(cur.model_fields)
    return None


def format_validation_error(err: ValidationError, model: type[BaseModel] = Config) -> str:
    """Render pydantic errors as 'field.path: message' lines, adding allowed keys for typos."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            msg = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{path}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `a.b.c=value` override; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b=c` override set (intermediate dicts created)."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        parts, value = parse_override(item)
        cur = out
        for p in parts[:-1]:
            nxt = cur.get(p)
            if nxt is None:
                nxt = cur[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            cur = nxt
        cur[parts[-1]] = value
    return out


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Validate a plain dict (plus overrides) into a Config, or raise ConfigError."""
    merged = apply_overrides(data or {}, overrides)
    try:
        return Config.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return config_from_dict(data, overrides)


def dump_config(cfg: Config) -> str:
    """The config as YAML (what every run records)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- reference
def _sections(model: type[BaseModel]) -> list[type[BaseModel]]:
    """The section models a field's annotation holds (X, X | None, list[X])."""
    ann = model
    args = getattr(ann, "__args__", None) or (ann,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def field_rows(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(path, type, default, description) of every field, depth first, as `docs/config.md` and
    `mirrorlab fields` show them (one description per field, written at the field)."""
    rows = []
    for name, f in model.model_fields.items():
        path = prefix + name
        subs = [s for a in (getattr(f.annotation, "__args__", None) or (f.annotation,)) for s in _sections(a)]
        if subs:
            rows.append((path, subs[0].__name__, "", f.description or (subs[0].__doc__ or "").split("\n")[0]))
            rows += field_rows(subs[0], path + ("[].") if "list" in str(f.annotation) else path + ".")
            continue
        typ = str(f.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
        if f.is_required():
            default = "(required)"
        elif f.default_factory is not None:
            default = repr(f.default_factory())
        else:
            default = repr(f.default)
        rows.append((path, typ, default, f.description or ""))
    return rows


def config_reference() -> str:
    """The Markdown reference of every config field (regenerate docs/config.md with
    `mirrorlab fields --markdown > docs/config.md`)."""
    out = ["# Configuration reference", "",
           "Every field of `mirrorlab.config.Config`, generated from the descriptions written at each field",
           "(`mirrorlab fields --markdown`). Set any of them in YAML or with `--set path=value`.", "",
           "| field | type | default | what it does |", "|---|---|---|---|"]
    for path, typ, default, desc in field_rows():
        cell = lambda s: s.replace("|", "\\|")  # noqa: E731
        out.append(f"| `{path}` | {cell(typ)} | {cell(default)} | {cell(desc)} |")
    return "\n".join(out) + "\n"
