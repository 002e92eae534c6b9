"""Inner-loop step time: mirrorlab GBMPOTrainer vs TRL 1.16 GRPOTrainer, side by side.

Same randomly initialised ~4.2M-parameter Qwen2 (hidden 256, 4 layers, MLP 1024, the tiny
preset's character tokenizer), same arithmetic prompts, 16 completions of exactly 64 tokens
per step (stop tokens suppressed until 64 so both sides do identical work), kl_k3 with beta
0.04 (TRL's default bias-corrected form on both sides), Dr. GRPO aggregation, fp32. The two
trainers alternate step by step (a TRL callback runs one mirrorlab step after each TRL step),
so machine noise hits both alike; the first `--warmup` steps of each are discarded.
Optionally one step of each on smollm2-135m (8 x 64), and (`--qwen-prompts`) on a random-init
model of Qwen2.5-0.5B's shape, for a GPU machine without the weights.

    python benchmarks/inner_step.py [--steps 10] [--warmup 2] [--device cpu|cuda] [--skip-smollm]
                                    [--backend fast|hf|vllm|fast,vllm]

`--backend fast,vllm` runs one mirrorlab trainer per backend in the same run (after each TRL step,
one step of each), so their ratios to TRL share the machine's noise; the vllm rows also record
the engine's start-up seconds and the weight push per step (`vllm` needs the vLLM environment,
`.venv-vllm`, see .ci/vllm). Prints a table and writes benchmarks/results/inner_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "inner_step.json"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_tiny4m(path: Path, seed: int = 0) -> None:
    """A random-init 4.2M-parameter Qwen2 with the character tokenizer, saved to `path`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mirrorlab.models import build_char_tokenizer
    from mirrorlab.tasks import get as get_task

    task = get_task("arithmetic")
    tok = build_char_tokenizer([task.charset], extra_chars=task.charset)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    ))
    model.save_pretrained(path)
    tok.save_pretrained(path)


# Qwen2.5-0.5B's shape (its config.json), for a random-init model on a machine without the weights
QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def make_qwen25_05b_shape(path: Path, seed: int = 0, **override: Any) -> None:
    """A random-init Qwen2 of Qwen2.5-0.5B's shape (494M parameters, 151,936-token vocabulary,
    tied head) saved to `path`, with the character tokenizer padded by placeholder tokens to the
    vocabulary, so every sampled id decodes. No weights are needed (the GPU machine has no hub);
    `override` changes config fields (a CPU smoke test uses fewer layers)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mirrorlab.models import build_char_tokenizer
    from mirrorlab.tasks import get as get_task

    task = get_task("arithmetic")
    tok = build_char_tokenizer([task.charset], extra_chars=task.charset)
    shape = {**QWEN25_05B, **override}
    tok.add_tokens([f"<x{i}>" for i in range(shape["vocab_size"] - len(tok))])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        **shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    ))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def run_pair(model_dir: Path, n_gen: int, max_new: int, warmup: int, steps: int, device: str,
             label: str, backend: str = "fast", cuda_graph: bool = True, prompts: int = 1,
             micro: int | None = None, compute_dtype: str = "auto",
             trl_bf16: bool = False, kv_cache_mb: int = 256) -> list[dict[str, Any]]:
    """Alternate TRL and mirrorlab steps on the model in `model_dir` (one mirrorlab trainer per
    comma-separated backend, each stepping after every TRL step); one timing row per backend.
    `prompts` x `n_gen` completions per step, in micro-batches of `micro` completions on both sides
    (TRL: per-device batch `micro`, gradient accumulation over the generated batch, one generation
    and one optimiser step per batch)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mirrorlab import divergences
    from mirrorlab.config import GenerationConfig, ModelConfig, OptimConfig, TrainConfig
    from mirrorlab.gbmpo import GBMPOTrainer
    from mirrorlab.models import load_model
    from mirrorlab.tasks import get as get_task

    task = get_task("arithmetic")
    total = warmup + steps
    cuda = device.startswith("cuda")

    # ---- mirrorlab: one trainer (own model copy) per backend
    backends = backend.split(",")
    ours: dict[str, Any] = {}
    for b in backends:
        model, tok = load_model(ModelConfig(name=str(model_dir), device=device))
        cfg = TrainConfig(
            steps=total, prompts_per_step=prompts, advantage="grpo", loss_type="dr_grpo",
            reg_times_ratio=True,
            micro_batch_size=micro, compute_dtype=compute_dtype,
            generation=GenerationConfig(num_generations=n_gen, max_new_tokens=max_new, min_new_tokens=max_new,
                                        backend=b, cuda_graph=cuda_graph, vllm_kv_cache_mb=kv_cache_mb),
            optim=OptimConfig(lr=1e-6), seed=0,
        )
        t = time.perf_counter()
        ours[b] = GBMPOTrainer(model, tok, task, divergences.get("kl_k3"), cfg, coef=0.04)
        ours[b].build_s = time.perf_counter() - t

    # ---- TRL
    by_q = {e.question: e for e in task.train}

    def reward(completions: list[str], prompts: list[str], **kw: Any) -> list[float]:
        return task.rewards(completions, [by_q[p] for p in prompts])

    ds = Dataset.from_list([{"prompt": task.prompt(e)} for e in task.train[:500]])
    tmp = tempfile.mkdtemp(prefix="trl-bench-")
    batch = prompts * n_gen
    mb = micro or batch
    args = GRPOConfig(
        output_dir=tmp, per_device_train_batch_size=mb, num_generations=n_gen,
        gradient_accumulation_steps=batch // mb, steps_per_generation=batch // mb,
        max_completion_length=max_new, generation_kwargs={"min_new_tokens": max_new}, beta=0.04,
        loss_type="dr_grpo", learning_rate=1e-6, max_steps=total, bf16=trl_bf16, use_cpu=not cuda,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
    )
    trl_tok = type(tok).from_pretrained(model_dir)  # TRL's own copy: padding_side is set on it
    trl_tok.padding_side = "left"
    trl = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=ds,
                      processing_class=trl_tok)

    rec: dict[str, Any] = {"trl": [], "trl_mem": []}
    for b in backends:
        rec[b] = {"mirrorlab": [], "ml_tokens": [], "ml_gen": [], "ml_mem": [], "sync": []}

    class Alternate(TrainerCallback):
        mark = 0.0

        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001
            if cuda:
                torch.cuda.synchronize()
                rec["trl_mem"].append(torch.cuda.max_memory_allocated() / 2**20)
            rec["trl"].append(time.perf_counter() - Alternate.mark)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for b, tr in ours.items():
                r = rec[b]
                t = time.perf_counter()
                m = tr.train_step()
                if cuda:
                    torch.cuda.synchronize()
                    r["ml_mem"].append(torch.cuda.max_memory_allocated() / 2**20)
                    torch.cuda.reset_peak_memory_stats()
                r["mirrorlab"].append(time.perf_counter() - t)
                r["ml_tokens"].append(m["gen_tokens"])
                r["ml_gen"].append(m["gen_time"])
                r["sync"].append(m.get("engine_sync_s", float("nan")))
            Alternate.mark = time.perf_counter()

    trl.add_callback(Alternate())
    Alternate.mark = time.perf_counter()
    trl.train()

    def summ(xs: list[float]) -> dict[str, float]:
        xs = xs[warmup:] or xs
        return {"mean": statistics.mean(xs), "median": statistics.median(xs),
                "min": min(xs), "n": len(xs)}

    tr = summ(rec["trl"])
    gen_tokens = batch * max_new
    rows = []
    for b, trainer in ours.items():
        r = rec[b]
        ml = summ(r["mirrorlab"])
        out = {
            "model": label, "params": sum(p.numel() for p in trainer.model.parameters()), "device": device,
            "backend": b, "cuda_graph": cuda_graph and cuda and b == "fast",
            "compute_dtype": str(trainer.compute_dtype).removeprefix("torch."), "trl_bf16": trl_bf16,
            "prompts": prompts, "completions": batch, "group": n_gen, "micro_batch": mb,
            "max_new_tokens": max_new, "warmup": warmup,
            "trl_s_per_step": tr, "mirrorlab_s_per_step": ml,
            "trl_tokens_per_s": gen_tokens / tr["median"],
            "mirrorlab_tokens_per_s":
                statistics.median(r["ml_tokens"][warmup:] or r["ml_tokens"]) / ml["median"],
            "ratio_median": ml["median"] / tr["median"], "ratio_mean": ml["mean"] / tr["mean"],
            "mirrorlab_generation_s": statistics.median(r["ml_gen"][warmup:] or r["ml_gen"]),
            "trainer_build_s": trainer.build_s,
            "raw": {"trl": rec["trl"], "mirrorlab": r["mirrorlab"]},
        }
        if trainer.backend == "vllm":  # vllm: engine start-up and the weight push before each generation
            out["engine_startup_s"] = trainer.rollouts.engine.stats.startup_s
            out["vllm_kv_cache_mb"] = kv_cache_mb
            out["engine_sync_s_per_step"] = statistics.median(r["sync"][warmup:] or r["sync"])
            out["raw"]["engine_sync_s"] = r["sync"]
        if cuda:
            out["trl_peak_mem_mb"] = max(rec["trl_mem"])
            out["mirrorlab_peak_mem_mb"] = max(r["ml_mem"])
        rows.append(out)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: multi-threading collapses on shared cores)")
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--backend", default="fast",
                    help="mirrorlab's generation backend(s), comma-separated, each stepped after every TRL "
                    "step (fast: lean sampler, hf: model.generate, vllm: colocated vLLM engine)")
    ap.add_argument("--no-cuda-graph", action="store_true",
                    help="fast backend on CUDA: decode step by step instead of replaying a CUDA graph")
    ap.add_argument("--smollm-steps", type=int, default=1,
                    help="timed steps (after 1 warm-up) of the SmolLM2 and Qwen2.5-0.5B-shaped rows")
    ap.add_argument("--smollm-prompts", default="1",
                    help="comma-separated prompts per step for the SmolLM2 rows (x 8 completions), e.g. 1,32")
    ap.add_argument("--smollm-micro", type=int, default=32,
                    help="SmolLM2 micro-batch (completions per forward/backward, both sides)")
    ap.add_argument("--qwen-prompts", default="",
                    help="also run a random-init Qwen2.5-0.5B-shaped model (no weights needed) at these "
                    "comma-separated prompts per step (x 8 completions x 64 tokens), e.g. 1,8; GPU-sized")
    ap.add_argument("--qwen-layers", type=int, default=QWEN25_05B["num_hidden_layers"],
                    help="layers of the Qwen2.5-0.5B-shaped model (fewer for a CPU smoke run)")
    ap.add_argument("--vllm-kv-cache-mb", type=int, default=256,
                    help="train.generation.vllm_kv_cache_mb (default 256; 32 x 8 x 64 on SmolLM2 needs ~430)")
    ap.add_argument("--skip-tiny", action="store_true", help="skip the tiny4m row")
    ap.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="mirrorlab's train.compute_dtype (auto: bf16 on CPUs with AMX / AVX512-BF16)")
    ap.add_argument("--trl-bf16", action="store_true",
                    help="TRL with bf16=True (mixed precision) instead of its fp32 default")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    load_start = list(os.getloadavg())
    if a.threads:
        torch.set_num_threads(a.threads)

    rows = []
    if not a.skip_tiny:
        with tempfile.TemporaryDirectory() as d:
            make_tiny4m(Path(d))
            rows += run_pair(Path(d), 16, 64, a.warmup, a.steps, a.device, "tiny4m", a.backend,
                             not a.no_cuda_graph, compute_dtype=a.compute_dtype, trl_bf16=a.trl_bf16,
                             kv_cache_mb=a.vllm_kv_cache_mb)
    def group_rows(path: Path, label: str, prompt_list: str) -> list[dict[str, Any]]:
        """The 8 x 64 rows (1 warm-up, `--smollm-steps` timed) at each comma-separated prompt count."""
        return [r for n in (int(x) for x in prompt_list.split(","))
                for r in run_pair(path, 8, 64, 1, a.smollm_steps, a.device, label, a.backend,
                                  not a.no_cuda_graph, prompts=n, micro=min(a.smollm_micro, 8 * n),
                                  compute_dtype=a.compute_dtype, trl_bf16=a.trl_bf16,
                                  kv_cache_mb=a.vllm_kv_cache_mb)]

    if a.qwen_prompts:
        label = "qwen2.5-0.5b-shape" + ("" if a.qwen_layers == QWEN25_05B["num_hidden_layers"]
                                        else f"-{a.qwen_layers}l")
        with tempfile.TemporaryDirectory() as d:
            make_qwen25_05b_shape(Path(d), num_hidden_layers=a.qwen_layers)
            rows += group_rows(Path(d), label, a.qwen_prompts)
    if not a.skip_smollm:
        from mirrorlab.models import smollm2_path

        try:
            p = smollm2_path()
        except (FileNotFoundError, ImportError) as e:
            print(f"skipping smollm2-135m: {e}")
        else:
            rows += group_rows(p, "smollm2-135m", a.smollm_prompts)

    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu"
    result = {
        "benchmark": "inner_step", "device": a.device, "device_name": dev, "threads": torch.get_num_threads(),
        "peak_rss_mb_process": _peak_rss_mb(), "rows": rows,
        "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
        "note": "ratio = mirrorlab / TRL step time (target <= 0.5); CPU peak memory is the whole process",
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    hdr = (f"{'model':20} {'backend':8} {'dtype':8} {'P x G x T':10} {'TRL s/step':>11} "
           f"{'ml s/step':>10} {'ratio':>6} "
           f"{'TRL tok/s':>10} {'ml tok/s':>9} {'ml gen s':>8}")
    graph = " (CUDA graph decode)" if rows and rows[0]["cuda_graph"] else ""
    print(f"device: {a.device} ({dev}), threads {torch.get_num_threads()}, "
          f"mirrorlab backend {a.backend}{graph}, TRL {'bf16' if a.trl_bf16 else 'fp32'}")
    print(hdr)
    for r in rows:
        shape = f"{r['prompts']}x{r['group']}x{r['max_new_tokens']}"
        print(f"{r['model']:20} {r['backend']:8} {r['compute_dtype']:8} {shape:10} "
              f"{r['trl_s_per_step']['median']:11.3f} "
              f"{r['mirrorlab_s_per_step']['median']:10.3f} {r['ratio_median']:6.2f} "
              f"{r['trl_tokens_per_s']:10.0f} {r['mirrorlab_tokens_per_s']:9.0f} "
              f"{r['mirrorlab_generation_s']:8.3f}"
              + (f"  mem MB trl {r['trl_peak_mem_mb']:.0f} ml {r['mirrorlab_peak_mem_mb']:.0f}"
                 if "trl_peak_mem_mb" in r else "")
              + (f"  engine start-up {r['engine_startup_s']:.1f} s, "
                 f"sync {r['engine_sync_s_per_step']:.3f} s/step"
                 if "engine_startup_s" in r else ""))
    print(f"peak RSS (process): {result['peak_rss_mb_process']:.0f} MB; wrote {a.out}")


if __name__ == "__main__":
    main()
