"""How fast the EPO loop runs, and how close to the machine's matmul peak (`epo-tui bench`).

Setups: `gpt2-small` (GPT-2 small's shapes, 12x768, V=50257, with random weights built here, the tiny
helper's tokenizer with every embedding row past its vocabulary banned, and a random sae-lens SAE of
24576 latents on blocks.8.hook_resid_pre; default search sizes), `tiny` (the tiny helper model with its
own config), or `config` (the model and SAE of --config). Nothing is downloaded; what is built is kept
under `<cache>/bench/`.

Per setup: seconds per iteration in each step (Search.step's Timings), the first iteration (which
compiles) apart, candidates/s and tokens/s; FLOPs per iteration from XLA's cost analysis of the
compiled steps and from an analytic count (flops.py); achieved FLOP/s and MFU against a matmul peak
measured in the same run on the same devices (peak.py); two structural checks (the fixed prefix is not recomputed by the
evaluation; the gradient pass computes no weight gradients). For the tiny model, the time from a
fresh process to its first finished iteration, with an empty and with a filled compilation cache.

    python -m epo_tui.bench.speed first-iteration CONFIG SPAWN_TIME   (internal: the warm-start child)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from epo_tui.bench.flops import analytic_flops, gradient_check, prefix_check, xla_flops
from epo_tui.bench.peak import measure_peak
from epo_tui.bench.report import Progress, console, load_average, load_text, print_goals, quiet, si
from epo_tui.bench.report import machine as machine_basics
from epo_tui.engine.runner import PlainSearch, Reporter, StopFlag, run_search
from epo_tui.errors import UserError

DEFAULT_ITERATIONS = {"gpt2-small": 3, "tiny": 20, "config": 5}
GPT2_SMALL = dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, vocab_size=50257, max_positions=1024,
                  layer_norm_eps=1e-5)
GPT2_SMALL_SAE = dict(d_sae=24576, hook_name="blocks.8.hook_resid_pre")
# starting prompts for models with random weights (sampling them rarely re-tokenizes to itself)
SEED_TEXT = ("The quick brown fox jumps over the lazy dog. Hello world, this is a tiny model. "
             "Legalization of cannabis was debated; officials refused to comment on the new law.")
GOALS = {"mfu": 0.5, "warm_start_s": 3.0, "evaluation_vs_full_forward": 0.65}
PEAK_SIZES = (1024, 2048, 4096)
WARM_RUNS = 2  # warm processes after the cold one; the best counts


# ----------------------------------------------------------------------------------------------
# Setups


@dataclass
class Setup:
    name: str
    description: str
    pair: Any  # ModelWithSAE
    config: Any  # Config
    seed_text: str | None  # start the elites from this text instead of sampling them
    load_s: float


def bench_folder() -> Path:
    from epo_tui import paths

    return paths.cache_dir() / "bench"


def tiny_config_path(folder: Path | None = None) -> Path:
    """The tiny helper's model, SAE and config.toml, written once under `<cache>/bench/tiny`."""
    from epo_tui.engine.tiny import main as write_tiny

    folder = folder or bench_folder() / "tiny"
    config = folder / "config.toml"
    if not config.is_file():  # quietly: --json prints only the report, progress goes to stderr
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            write_tiny([str(folder)])
    return config


def gpt2_small_setup(dtype: str = "float32", seed: int = 0) -> tuple[Any, str]:
    """(ModelWithSAE, description): GPT-2 small's shapes, random weights, a random 24576-latent SAE."""
    import jax
    from transformers import AutoTokenizer

    from epo_tui.config import SAEConfig
    from epo_tui.engine.language_model import DTYPES, LanguageModel
    from epo_tui.engine.models.gpt2 import GPT2Config
    from epo_tui.engine.pairing import ModelWithSAE
    from epo_tui.engine.sae_loading import load_sae
    from epo_tui.engine.sae_writer import write_random_sae
    from epo_tui.engine.tiny import write_tokenizer

    folder = bench_folder() / "gpt2-small-shapes"
    tokenizer_dir, sae_dir = folder / "tokenizer", folder / "sae"
    folder.mkdir(parents=True, exist_ok=True)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        write_tokenizer(tokenizer_dir, "gpt2")
    if not (sae_dir / "cfg.json").is_file():  # written aside, then renamed: never half an SAE
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".sae-"))
        write_random_sae(staging, d_in=GPT2_SMALL["d_model"], seed=seed, model_name="gpt2-small-shapes",
                         **GPT2_SMALL_SAE)
        try:
            os.replace(staging, sae_dir)
        except OSError:  # another bench wrote it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    cfg = GPT2Config(**GPT2_SMALL)
    params = jax.tree.map(lambda a: a.astype(DTYPES[dtype]), random_gpt2_params(cfg, seed))
    jax.block_until_ready(params)
    model = LanguageModel(name="gpt2-small shapes (random weights)", model_type="gpt2", cfg=cfg, params=params,
                          tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), dtype=dtype)
    sae = load_sae(SAEConfig(release=None, id=None, path=str(sae_dir)))
    description = (f"GPT-2 small shapes, random weights ({dtype}): {cfg.n_layers} layers, d_model "
                   f"{cfg.d_model}, V {cfg.vocab_size} ({len(model.tokenizer)} proposable); random SAE "
                   f"{sae.d_sae} latents on {sae.hook_name}")
    return ModelWithSAE(model=model, sae=sae), description


def random_gpt2_params(cfg, seed: int = 0) -> dict:
    """Our GPT-2 pytree (as gpt2.params_from_checkpoint builds it) with GPT-2's initialization
    (normal, std 0.02), drawn with numpy (quicker than compiling JAX's PRNG for 124M numbers)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    D, F, V, H, K = cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.n_heads, cfg.head_dim

    def normal(*shape, std=0.02):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def ones(n):
        return jnp.ones(n, jnp.float32)

    def zeros(n):
        return jnp.zeros(n, jnp.float32)

    blocks = [{
        "ln1_g": ones(D), "ln1_b": zeros(D),
        "w_qkv_Dx3xHxK": normal(D, 3 * D).reshape(D, 3, H, K), "b_qkv": zeros(3 * D),
        "w_o_HxKxD": normal(D, D).reshape(H, K, D), "b_o": zeros(D),
        "ln2_g": ones(D), "ln2_b": zeros(D),
        "w_in_DxF": normal(D, F), "b_in": zeros(F),
        "w_out_FxD": normal(F, D), "b_out": zeros(D),
    } for _ in range(cfg.n_layers)]
    return {"wte_VxD": normal(V, D), "wpe_PxD": normal(cfg.max_positions, D, std=0.01),
            "lnf_g": ones(D), "lnf_b": zeros(D), "blocks": blocks}


def make_setup(model: str, config=None, dtype: str = "float32") -> Setup:
    """The model, SAE and search sizes a setup benchmarks."""
    from epo_tui.config import Config, SearchConfig, load_config
    from epo_tui.engine.pairing import load_model_with_sae

    t0 = time.perf_counter()
    if model == "gpt2-small":
        pair, description = gpt2_small_setup(dtype)
        config = Config(search=SearchConfig(), source="bench")  # default sizes, feature 234
        return Setup(model, description, pair, config, SEED_TEXT, time.perf_counter() - t0)
    if model == "tiny":
        config = load_config(str(tiny_config_path()))
        pair = load_model_with_sae(config)
        return Setup(model, f"the tiny helper model ({config.source})", pair, config, None, time.perf_counter() - t0)
    if config is None:
        config = load_config(None)
    pair = load_model_with_sae(config)
    return Setup(model, f"{pair.model.name} with {pair.sae.display_name} ({config.source})", pair, config, None,
                 time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# One setup


class _Measured(Reporter):
    """What the speed benchmark keeps of each iteration `run_search` reports: the seconds of each step, the
    wall and CPU seconds, and (past the first, which compiles) the evaluation's counts."""

    def __init__(self, stepper: PlainSearch, name: str, progress: Progress):
        self.stepper, self.name, self.progress = stepper, name, progress
        self.per_iteration: list[dict] = []
        self.calls: dict[int, int] = {}  # evaluation calls per bucket start, steady iterations
        self.children = self.positions = self.ran = self.known = 0
        self._cpu, self._last_print = time.process_time(), 0.0

    def iteration_done(self, state, seconds: float) -> None:
        timings, i = self.stepper.last_timings, len(self.per_iteration)
        cpu, self._cpu = time.process_time() - self._cpu, time.process_time()
        total = self.stepper.iterations_total
        if i > 0 or total == 1:
            counts = self.stepper.search.scorer.last
            self.children += counts.children
            self.positions += counts.positions
            self.ran, self.known = self.ran + counts.run, self.known + counts.known
            for bucket, n in (counts.calls or {}).items():
                self.calls[bucket] = self.calls.get(bucket, 0) + n
        self.per_iteration.append({"gradients": timings.gradients, "proposals": timings.proposals,
                                   "evaluation": timings.evaluation, "selection": timings.selection,
                                   "total": timings.total, "wall": seconds, "cpu": cpu})
        if i in (0, total - 1) or time.perf_counter() - self._last_print > 2.0:  # not one line per ms
            self._last_print = time.perf_counter()
            self.progress(f"[{self.name}] iteration {i + 1}/{total}: {seconds:.2f} s (gradients "
                          f"{timings.gradients:.2f}, proposals {timings.proposals:.2f}, evaluation "
                          f"{timings.evaluation:.2f}, selection {timings.selection:.2f})"
                          + (" (compiles)" if i == 0 else ""))


def bench_setup(setup: Setup, iterations: int, progress: Progress = quiet) -> dict:
    """Runs `iterations` EPO iterations (the first compiles) through the loop `epo-tui run` steps
    (runner.run_search) and measures everything per iteration. Rates against the peak are added by
    `with_rates`. Ctrl-C stops after the current iteration and reports those run."""
    import jax

    from epo_tui.engine.search import Search

    config = replace(setup.config, search=replace(setup.config.search, iterations=iterations))
    t0 = time.perf_counter()
    search = Search(setup.pair, config)
    t1 = time.perf_counter()
    progress(f"[{setup.name}] starting prompts")
    stepper = PlainSearch(search, iterations, seed_text=setup.seed_text)
    t2 = time.perf_counter()
    st = search.st
    K, C, N = st.elites, st.candidates, st.prompt_tokens
    measured = _Measured(stepper, setup.name, progress)
    with StopFlag() as stop:
        run_search(stepper, measured, stop)
    if not measured.per_iteration:
        raise UserError("bench: stopped before its first iteration finished")
    state, per_iteration, calls = stepper.state, measured.per_iteration, measured.calls
    children, positions, ran, known = measured.children, measured.positions, measured.ran, measured.known
    iterations = len(per_iteration)

    progress(f"[{setup.name}] FLOP counts")
    xla = xla_flops(search, state, calls, children, max(iterations - 1, 1))
    analytic = analytic_flops(search, positions / max(children * N, 1))
    steady = per_iteration[1:] or per_iteration
    mean = {k: statistics.fmean(r[k] for r in steady) for k in per_iteration[0]}
    model, sae = setup.pair.model, setup.pair.sae
    return {
        "name": setup.name,
        "description": setup.description,
        "model": {"type": model.model_type, "layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
                  "vocab": model.vocab_size, "proposable_tokens": int((~_np(search.banned_V)).sum()),
                  "params": analytic["model_params"], "dtype": model.dtype},
        "sae": {"d_sae": sae.d_sae, "hook": sae.hook_name, "architecture": sae.architecture},
        "search": {"elites": K, "candidates": C, "prompt_tokens": N, "topk": st.topk,
                   "prefix_tokens": len(search.prefix_ids), "batch": K * C, "devices": search.mesh.size,
                   "eval_chunk": xla["evaluation_chunk"]},
        "iterations": iterations,
        "load_s": setup.load_s,
        "search_init_s": t1 - t0,
        "initial_state_s": t2 - t1,
        "first_iteration_s": per_iteration[0]["total"],
        "time_to_first_iteration_s": setup.load_s + (t2 - t0) + per_iteration[0]["wall"],
        # steady iterations' children: run, and distinct ones scored in an earlier iteration (not run)
        "children": {"proposed": children, "run": ran, "known": known},
        "per_iteration": per_iteration,
        "steady_iterations": len(steady),
        "mean_s": mean,
        "best_total_s": min(r["total"] for r in steady),
        "median_total_s": statistics.median(r["total"] for r in steady),
        "candidates_per_s": K * C / mean["total"],
        "tokens_per_s": K * C * N / mean["total"],
        "flops_per_iteration": {"xla": xla, "analytic": analytic},
        "checks": {"prefix": prefix_check(search), "gradients": gradient_check(xla, analytic)},
        "jax": {"version": jax.__version__, "backend": jax.default_backend()},
    }


def with_rates(result: dict, peak: dict) -> dict:
    """Adds achieved FLOP/s (mean over the steady iterations) and MFU = FLOP/s / measured peak (the
    float32 one, or the bfloat16 one for bfloat16 weights); and the same by CPU time (iteration FLOPs
    per CPU-second / matmul FLOPs per CPU-second)."""
    xla, analytic = result["flops_per_iteration"]["xla"], result["flops_per_iteration"]["analytic"]
    mean = result["mean_s"]

    def rate(flops: float, seconds: float) -> float:
        return flops / seconds if seconds > 0 else 0.0

    achieved = {
        "iteration_xla": rate(xla["total"], mean["total"]),
        "iteration_analytic": rate(analytic["total"], mean["total"]),
        "iteration_xla_best": rate(xla["total"], result["best_total_s"]),
        "gradients_xla": rate(xla["gradients"], mean["gradients"]),
        "evaluation_xla": rate(xla["evaluation"], mean["evaluation"]),
        "evaluation_analytic": rate(analytic["evaluation"], mean["evaluation"]),
    }
    prefix = "bfloat16_" if result["model"]["dtype"] == "bfloat16" else ""  # bfloat16 weights: its peak
    peak_flops, peak_per_cpu = peak[f"{prefix}flops_per_s"], peak[f"{prefix}flops_per_cpu_s"]
    mfu = {name: value / peak_flops for name, value in achieved.items()}
    mfu["iteration_xla_cpu_time"] = rate(xla["total"], mean["cpu"]) / peak_per_cpu
    return {**result, "peak_flops_per_s": peak_flops, "flops_per_s": achieved, "mfu": mfu}


def _np(array):
    import numpy as np

    return np.asarray(array)


# ----------------------------------------------------------------------------------------------
# Warm start: a fresh process to its first finished iteration, cold and warm compilation cache


def first_iteration_child(config_path: str, spawn_time: float) -> dict:
    """What a run does up to its first iteration, timed from the parent's spawn (wall clock)."""
    marks = {"interpreter": time.time()}
    import jax  # noqa: F401 - timed on its own

    marks["import_jax"] = time.time()
    from epo_tui.config import load_config
    from epo_tui.engine.compile_cache import enable_compile_cache
    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.engine.search import Search

    marks["import_engine"] = time.time()
    cache = enable_compile_cache()
    config = load_config(config_path)
    pair = load_model_with_sae(config)
    marks["load_model_and_sae"] = time.time()
    search = Search(pair, config)
    marks["search_init"] = time.time()
    state = search.initial_state()
    marks["initial_state"] = time.time()
    search.step(state)
    marks["first_iteration"] = time.time()
    phases, previous = {}, spawn_time
    for name, at in marks.items():
        phases[name] = at - previous
        previous = at
    return {"to_first_iteration_s": marks["first_iteration"] - spawn_time, "phases_s": phases,
            "compile_cache": str(cache) if cache else None}


def _spawn_first_iteration(config_path: Path, cache: str) -> dict:
    env = {**os.environ, "EPO_TUI_JAX_CACHE": cache}
    spawn = time.time()
    done = subprocess.run([sys.executable, "-m", "epo_tui.bench.speed", "first-iteration", str(config_path),
                           repr(spawn)], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the warm-start child failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def warm_start(config_path: Path, warm_runs: int = 2, progress: Progress = quiet) -> dict:
    """Fresh process -> first finished iteration: once with an empty compilation cache folder (cold),
    then `warm_runs` times with it filled (warm, best reported)."""
    with tempfile.TemporaryDirectory(prefix="epo-bench-jax-") as cache:
        progress("[warm start] cold process (empty compilation cache)")
        cold = _spawn_first_iteration(config_path, cache)
        warm = []
        for i in range(warm_runs):
            progress(f"[warm start] warm process {i + 1}/{warm_runs}")
            warm.append(_spawn_first_iteration(config_path, cache))
    best = min(warm, key=lambda r: r["to_first_iteration_s"])
    return {"model": "tiny", "config": str(config_path), "cold_s": cold["to_first_iteration_s"],
            "warm_s": best["to_first_iteration_s"], "warm_runs_s": [r["to_first_iteration_s"] for r in warm],
            "cold_phases_s": cold["phases_s"], "warm_phases_s": best["phases_s"],
            "goal_s": GOALS["warm_start_s"]}


# ----------------------------------------------------------------------------------------------
# The whole benchmark


def machine() -> dict:
    """The machine (report.machine) and what JAX runs on."""
    import jax

    devices = jax.local_devices()
    return {**machine_basics(), "backend": jax.default_backend(), "devices": len(devices),
            "device_kind": devices[0].device_kind, "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "compile_cache": jax.config.values.get("jax_compilation_cache_dir")}


def goals(report: dict) -> list[dict]:
    """The targets the loop is measured against (reported, not asserted)."""
    out = []
    for setup in report["setups"]:
        if setup["name"] == "gpt2-small":
            mfu = setup["mfu"]["iteration_xla"]
            out.append({"goal": "search loop >= 50% MFU on GPT-2 small shapes, default sizes",
                        "target": GOALS["mfu"], "measured": mfu, "met": mfu >= GOALS["mfu"]})
        prefix = setup["checks"]["prefix"]
        if prefix.get("checked"):
            out.append({"goal": f"[{setup['name']}] fixed prefix computed once (evaluation cost grows by "
                                "attention only)", "target": "< 0.25", "measured": prefix["added_over_recomputed"],
                        "met": prefix["prefix_computed_once"]})
        share = setup["flops_per_iteration"]["xla"]["evaluation_vs_full_forward"]
        out.append({"goal": f"[{setup['name']}] evaluation FLOPs per child / a full forward (XLA)",
                    "target": f"<= {GOALS['evaluation_vs_full_forward']}", "measured": share,
                    "met": bool(share <= GOALS["evaluation_vs_full_forward"])})
        grads = setup["checks"]["gradients"]
        out.append({"goal": f"[{setup['name']}] gradient pass computes no weight gradients",
                    "target": "xla/activation-only ~ 1", "measured": grads["xla_over_activation_only"],
                    "met": grads["no_weight_gradients"]})
    if report.get("warm_start"):
        ws = report["warm_start"]
        out.append({"goal": "warm start to first finished iteration (tiny)", "target": ws["goal_s"],
                    "measured": ws["warm_s"], "met": ws["warm_s"] <= ws["goal_s"]})
    return out


def run_bench(model: str | None = None, config=None, iterations: int | None = None, dtype: str = "float32",
              warm: bool = True, progress: Progress = quiet) -> dict:
    """The benchmark as one JSON-able dict. `model` None: gpt2-small then tiny (and the warm start).

    The matmul peak is measured before and after the setups and the larger is used: on a shared
    machine a neighbour's load lowers one of them.
    """
    models = [model] if model else ["gpt2-small", "tiny"]
    report: dict[str, Any] = {"machine": machine()}
    progress(f"measuring the matmul peak ({report['machine']['devices']} device(s))")
    before = measure_peak(PEAK_SIZES)
    progress(f"peak {before['flops_per_s'] / 1e9:.0f} GFLOP/s (float32, n={before['size']})")
    setups = []
    for name in models:
        progress(f"[{name}] loading")
        setup = make_setup(name, config=config, dtype=dtype)
        setups.append(bench_setup(setup, max(iterations or DEFAULT_ITERATIONS[name], 1), progress))
    progress("measuring the matmul peak again")
    after = measure_peak(PEAK_SIZES)
    report["peak"] = {**max(before, after, key=lambda p: p["flops_per_s"]),
                      "before_flops_per_s": before["flops_per_s"], "after_flops_per_s": after["flops_per_s"]}
    for key in ("flops_per_cpu_s", "bfloat16_flops_per_s", "bfloat16_flops_per_cpu_s"):
        report["peak"][key] = max(before[key], after[key])
    report["setups"] = [with_rates(s, report["peak"]) for s in setups]
    report["warm_start"] = None
    if warm and "tiny" in models:
        report["warm_start"] = warm_start(tiny_config_path(), WARM_RUNS, progress=progress)
    report["machine"]["load_average_end"] = load_average()
    report["goals"] = goals(report)
    return report


# ----------------------------------------------------------------------------------------------
# Human output


def print_report(report: dict) -> None:
    from rich.table import Table

    out = console()
    m, peak = report["machine"], report["peak"]
    load = f"; {load_text(m)}" if load_text(m) else ""
    out.print(f"{m['backend']} x{m['devices']} ({m['processor']}, {m['cpu_count']} cores), jax {m['jax']}; "
                  f"measured matmul peak {si(peak['flops_per_s'], 'FLOP/s')} float32, "
                  f"{si(peak['bfloat16_flops_per_s'], 'FLOP/s')} bfloat16 ({peak['size']}^3, best of "
                  f"{peak['repeats']}){load}")
    setups = report["setups"]
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("")
    for setup in setups:
        table.add_column(setup["name"], justify="right")

    def row(label: str, cell: Callable[[dict], str]) -> None:
        table.add_row(label, *(cell(s) for s in setups))

    row("model", lambda s: f"{s['model']['layers']}x{s['model']['d_model']}, V {s['model']['vocab']}")
    row("elites x candidates x tokens", lambda s: f"{s['search']['elites']} x {s['search']['candidates']} x "
        f"{s['search']['prompt_tokens']}")
    row("iterations (steady)", lambda s: f"{s['iterations']} ({s['steady_iterations']})")
    row("first iteration (compiles)", lambda s: f"{s['first_iteration_s']:.2f} s")
    row("load + start + first iteration", lambda s: f"{s['time_to_first_iteration_s']:.2f} s")
    for step in ("gradients", "proposals", "evaluation", "selection", "total"):
        row(f"  {step}", lambda s, step=step: f"{s['mean_s'][step]:.3f} s")
    row("candidates/s", lambda s: si(s["candidates_per_s"]))
    row("tokens/s", lambda s: si(s["tokens_per_s"]))
    row("FLOPs/iteration (XLA)", lambda s: si(s["flops_per_iteration"]["xla"]["total"]))
    row("FLOPs/iteration (analytic)", lambda s: si(s["flops_per_iteration"]["analytic"]["total"]))
    row("evaluation FLOPs/child vs full", lambda s: f"{s['flops_per_iteration']['xla']['evaluation_vs_full_forward']:.2f}")
    row("children run | known from before", lambda s: " | ".join(
        f"{s['children'][k] / max(s['children']['proposed'], 1):.0%}" for k in ("run", "known")))
    row("FLOP/s iteration (XLA)", lambda s: si(s["flops_per_s"]["iteration_xla"]))
    row("MFU iteration (XLA | analytic)", lambda s: f"{s['mfu']['iteration_xla']:.1%} | "
        f"{s['mfu']['iteration_analytic']:.1%}")
    row("MFU iteration by CPU time", lambda s: f"{s['mfu']['iteration_xla_cpu_time']:.1%}")
    row("MFU gradients | evaluation", lambda s: f"{s['mfu']['gradients_xla']:.1%} | {s['mfu']['evaluation_xla']:.1%}")
    row("prefix computed once", lambda s: "-" if not s["checks"]["prefix"].get("checked") else
        f"{s['checks']['prefix']['prefix_computed_once']} ({s['checks']['prefix']['added_over_recomputed']:.3f})")
    row("no weight gradients", lambda s: f"{s['checks']['gradients']['no_weight_gradients']} "
        f"({s['checks']['gradients']['xla_over_activation_only']:.2f})")
    out.print(table)
    ws = report.get("warm_start")
    if ws:
        out.print(f"fresh process -> first finished iteration (tiny): cold {ws['cold_s']:.2f} s, "
                      f"warm {ws['warm_s']:.2f} s; warm phases: " +
                      ", ".join(f"{k} {v:.2f}" for k, v in ws["warm_phases_s"].items()))
    print_goals(out, report["goals"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "first-iteration":
        print(json.dumps(first_iteration_child(argv[1], float(argv[2]))))
        return 0
    print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
