"""`epo-tui registry`: the installed sae-lens registry's coverage, each entry's kind checked against
sae-lens's own config getters run offline (downloads stubbed where the stub does not decide the answer)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from epo_tui.engine import models, registry, sae
from epo_tui.engine.models import hooks
from epo_tui.terminal import REGISTRY_WIDTH
from tests.cli_run import run_cli

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def directory():
    return registry.read_directory()


def entries(directory, loader: str):
    """(lookup, sae_id) for every entry of every release with that conversion function."""
    found = [(lookup, sae_id) for lookup in directory.values() if registry.conversion_func(lookup) == loader
             for sae_id in lookup.saes_map]
    assert found, f"no release of the installed registry uses {loader}"
    return found


# ----------------------------------------------------------------------------------------------
# Reading the registry


@pytest.mark.slow  # imports sae-lens (torch, TransformerLens): about 5 s
def test_fast_reader_matches_sae_lens_api(directory):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    official = get_pretrained_saes_directory()
    assert directory.keys() == official.keys()
    for name, lookup in official.items():
        mine = directory[name]
        assert (mine.model, mine.repo_id, mine.conversion_func, mine.saes_map, mine.config_overrides) == \
            (lookup.model, lookup.repo_id, lookup.conversion_func, lookup.saes_map, lookup.config_overrides)


def test_reading_the_registry_imports_neither_sae_lens_nor_torch():
    code = ("import sys; from epo_tui.engine import registry; d = registry.read_directory(); "
            "assert d and 'sae_lens' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=60)


def test_total_is_the_sum_over_releases_and_every_model_is_known(directory):
    report = registry.coverage(directory)
    assert report["total"]["saes"] == sum(len(lookup.saes_map) for lookup in directory.values())
    assert report["total"]["saes"] == sum(r["saes"] for r in report["releases"])
    assert report["total"]["releases"] == len(directory)
    assert report["total"]["loaded"] == sum(r["loaded"] for r in report["releases"])
    assert sum(report["total"]["not_loaded"].values()) == report["total"]["saes"] - report["total"]["loaded"]
    for release in report["releases"]:
        assert sum(k["saes"] for k in release["kinds"]) == release["saes"]
    unknown = {lookup.model for lookup in directory.values()} - set(registry.MODELS)
    assert not unknown, f"models missing from registry.MODELS: {unknown}"
    assert not [r for r in report["releases"] if any(k["architecture"] is None or k["hook"] is None
                                                     for k in r["kinds"])]


# ----------------------------------------------------------------------------------------------
# Each conversion function's entries against sae-lens's own config getter


class FakeHub:
    """hf_hub_download / get_safetensors_tensor_shapes for sae-lens's config getters: small files whose
    content is not what the test checks (sizes, thresholds), and EntryNotFoundError for files the getter
    can do without (Gemma Scope 2's config.json: it then infers the config from the folder name)."""

    FILES = {
        "wandb-config.yaml": "d_model: {value: 8}\nd_feature: {value: 16}\nbatch_size: {value: 4}\n",
        "config.yaml": "model_name: some/model\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n",
        "conf.yaml": ("llm: {dimin: 8}\nsae: {exp_factor: 2, n_heads: 1, n_attn_layers: 1, bottleneck_factor: 1, "
                      "sae_diff_type: topk, kval_topk: 2, tied_weights: true, scaling_factor: 1.0}\n"
                      "data: {dtype: float32}\n"),
        "_cfg.json": '{"act_size": 8, "dict_size": 16, "act_name": "blocks.0.attn.hook_z"}',
        "hyperparams.json": ('{"d_model": 8, "d_sae": 16, "jump_relu_threshold": 0.1, "hook_point_in": "x",'
                             ' "dataset_average_activation_norm": {"in": 1.0}}'),
    }

    def __init__(self, folder: Path, missing: tuple[str, ...] = ()):
        self.folder, self.missing = folder, missing

    def download(self, repo_id, filename=None, *args, subfolder=None, **kwargs):
        from huggingface_hub.utils import EntryNotFoundError

        name = f"{subfolder}/{filename}" if subfolder else filename
        if any(name.endswith(m) for m in self.missing):
            raise EntryNotFoundError(f"{name} (stubbed)")
        for suffix, text in self.FILES.items():
            if name.endswith(suffix):
                path = self.folder / suffix.lstrip("_")
                path.write_text(text)
                return str(path)
        raise AssertionError(f"the test has no stub for {repo_id}/{name}")

    @staticmethod
    def shapes(repo_id, filename):
        class Shapes(dict):
            def __missing__(self, key):  # mntss reads b_enc_<layer> / b_dec_<layer>
                return [16] if key.startswith("b_enc") else [8]

        return Shapes(w_enc=[8, 16], w_dec=[16, 8])


def sae_lens_config(lookup, sae_id: str) -> dict:
    """sae-lens's config for the entry, the way SAE.from_pretrained builds it (overrides, defaulting)."""
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    return load_sae_config_from_huggingface(lookup.release, sae_id)


def cfg_field(cfg: dict, name: str):
    """A config field, at the top or (sae-lens >= 6 layout) in its metadata."""
    return cfg.get(name) or (cfg.get("metadata") or {}).get(name)


def hook_of(cfg: dict) -> str:
    return registry._layer_hook(cfg_field(cfg, "hook_name"))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    from sae_lens.loading import pretrained_sae_loaders as loaders

    hub = FakeHub(tmp_path, missing=("config.json",))
    monkeypatch.setattr(loaders, "hf_hub_download", hub.download)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", hub.shapes)
    return hub


# sae-lens derives both the architecture and the hook from the registry entry alone (the stubbed
# files hold only sizes), so the classification must agree on every entry.
@pytest.mark.slow
@pytest.mark.parametrize("loader", ["gemma_2", "gemma_3", "gemma_2_transcoder", "qwen_scope", "goodfire",
                                    "deepseek_r1", "mwhanna_transcoder", "temporal"])
def test_kind_equals_sae_lens_config(directory, fake_hub, loader):
    import warnings

    seen = Counter()
    for lookup, sae_id in entries(directory, loader):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = sae_lens_config(lookup, sae_id)
        kind = registry.classify(lookup, sae_id)
        assert (kind.architecture, kind.hook) == (cfg["architecture"], hook_of(cfg)), (lookup.release, sae_id)
        assert kind.hf_hook == bool(cfg_field(cfg, "hf_hook_name")), (lookup.release, sae_id)
        seen[kind.label] += 1
    if loader == "gemma_3":  # every Gemma Scope 2 kind is in the registry
        assert {"jumprelu", "jumprelu hook_z", "jumprelu_transcoder", "jumprelu_skip_transcoder"} <= set(seen)
    if loader == "gemma_2":
        assert {"jumprelu", "jumprelu hook_z", "jumprelu hook_embed"} <= set(seen)


# sae-lens reads the hook from a file on the hub for these; the architecture is still its code's.
@pytest.mark.slow
@pytest.mark.parametrize("loader", ["connor_rob_hook_z", "llama_scope", "llama_scope_r1_distill",
                                    "mntss_clt_layer_transcoder"])
def test_architecture_equals_sae_lens_config(directory, fake_hub, monkeypatch, loader):
    monkeypatch.setitem(FakeHub.FILES, "config.json", '{"d_model": 8, "expansion_factor": 2, "hook_point_in": "x"}')
    if loader == "llama_scope_r1_distill":  # its config.json is required: serve it
        fake_hub.missing = ()
    for lookup, sae_id in entries(directory, loader)[:50]:
        cfg = sae_lens_config(lookup, sae_id)
        kind = registry.classify(lookup, sae_id)
        assert kind.architecture == cfg["architecture"], (lookup.release, sae_id)
        if loader == "connor_rob_hook_z":
            assert (kind.hook == "attn.hook_z") == (cfg["reshape_activations"] == "hook_z")


def test_llama_scope_hooks_follow_the_folder(directory):
    """hyperparams.json's hook_point_in, as the repos' L{layer}{R|A|M} folders name it."""
    for lookup, sae_id in entries(directory, "llama_scope"):
        sublayer = lookup.saes_map[sae_id].split("-")[-2][-1]  # Llama3_1-8B-Base-L12A-8x -> A
        expected = {"R": "hook_resid_post", "A": "hook_attn_out", "M": "hook_mlp_out"}[sublayer]
        assert registry.classify(lookup, sae_id) == registry.Kind("jumprelu", expected)
    for lookup, sae_id in entries(directory, "llama_scope_r1_distill"):
        assert registry.classify(lookup, sae_id) == registry.Kind("jumprelu", "hook_resid_post")


def test_dictionary_learning_kinds_follow_the_trainer_names(directory):
    """config.json's dict_class (on the hub), as the release and folder names say it."""
    expect = {"sae_bench_gemma-2-2b_topk_width-2pow12_date-1109": registry.Kind("topk", "hook_resid_post"),
              "sae_bench_gemma-2-2b_vanilla_width-2pow14_date-1109": registry.Kind("standard", "hook_resid_post"),
              "sae_bench_pythia70m_sweep_gated_ctx128_0730": registry.Kind("gated", "hook_resid_post"),
              "sae_bench_pythia70m_sweep_panneal_ctx128_0730": registry.Kind("standard", "hook_resid_post",
                                                                             "p-anneal"),
              "saebench_gemma-2-2b_width-2pow12_date-0108": registry.Kind("jumprelu", "hook_resid_post",
                                                                          "matryoshka"),
              "saebench_gemma-2-2b_width-2pow16_date-0107": registry.Kind("jumprelu", "hook_resid_post",
                                                                          "matryoshka"),
              "llama-3.1-8b-instruct-andyrdt": registry.Kind("jumprelu", "hook_resid_post", "batchtopk")}
    for release, kind in expect.items():
        lookup = directory[release]
        assert {registry.classify(lookup, sae_id) for sae_id in lookup.saes_map} == {kind}, release
    labels = {registry.classify(lookup, sae_id).label for lookup, sae_id in entries(directory, "dictionary_learning_1")}
    assert "unknown" not in labels


def test_sae_lens_format_kinds(directory):
    """sae-lens's own format: cfg.json on the hub; the registry's ids name the hooks."""
    def kinds(release):
        lookup = directory[release]
        return Counter(registry.classify(lookup, sae_id) for sae_id in lookup.saes_map)

    assert kinds("gpt2-small-res-jb") == Counter({registry.Kind("standard", "hook_resid_pre"): 12,
                                                  registry.Kind("standard", "hook_resid_post"): 1})
    assert set(kinds("gpt2-small-res-jb-feature-splitting")) == {registry.Kind("standard", "hook_resid_pre")}
    assert set(kinds("gpt2-small-resid-mid-v5-32k")) == {registry.Kind("topk", "hook_resid_mid")}
    assert set(kinds("gemma-2-2b-res-matryoshka-dc")) == {registry.Kind("jumprelu", "hook_resid_post", "matryoshka")}
    assert set(kinds("pythia-70m-deduped-att-sm")) == {registry.Kind("standard", "hook_attn_out")}
    assert set(kinds("mistral-7b-res-wg")) == {registry.Kind("standard", "hook_resid_pre")}


# ----------------------------------------------------------------------------------------------
# Loadability follows the engine at run time


def test_loaded_share_follows_families_architectures_hooks_and_loaders(directory, monkeypatch):
    base = registry.coverage(directory)["total"]

    def loaded() -> int:
        return registry.coverage(directory)["total"]["loaded"]

    def saes(match) -> int:
        return sum(len(lookup.saes_map) for lookup in directory.values() if match(lookup))

    monkeypatch.setattr(models, "FAMILIES", {})
    assert loaded() == 0
    monkeypatch.undo()
    assert loaded() == base["loaded"]

    # Llama: everything but the temporal SAEs loads (Llama Scope, a sae-lens-format SAE, and the Goodfire,
    # DeepSeek and andyrdt checkpoints that torch's weights-only loader reads)
    llama = {name for name, model in registry.MODELS.items() if model.model_type == "llama"}
    monkeypatch.delitem(models.FAMILIES, "llama")
    assert loaded() == base["loaded"] - saes(lambda lookup: lookup.model in llama and lookup.conversion_func in
                                             ("llama_scope", "llama_scope_r1_distill", None, "goodfire",
                                              "deepseek_r1", "dictionary_learning_1"))
    monkeypatch.undo()

    # Transcoders need their architecture, and Gemma Scope's Gemma 2 ones their input hook too
    monkeypatch.setattr(sae, "SUPPORTED", tuple(a for a in sae.SUPPORTED if a != "jumprelu_transcoder"))
    assert loaded() < base["loaded"]
    monkeypatch.undo()
    transcoders = saes(lambda lookup: lookup.conversion_func == "gemma_2_transcoder")
    monkeypatch.setattr(hooks, "BLOCK_POINTS", tuple(p for p in hooks.BLOCK_POINTS if p != "ln2.hook_normalized"))
    assert transcoders > 0 and loaded() == base["loaded"] - transcoders
    monkeypatch.undo()

    monkeypatch.setattr(hooks, "BLOCK_POINTS", tuple(p for p in hooks.BLOCK_POINTS if p != "attn.hook_z"))
    hook_z = saes(lambda lookup: (lookup.conversion_func == "gemma_2" and "-att" in lookup.repo_id)
                  or (lookup.conversion_func == "gemma_3" and "-att" in lookup.release)
                  or lookup.conversion_func == "connor_rob_hook_z")
    assert hook_z > 0 and loaded() == base["loaded"] - hook_z
    monkeypatch.undo()


def test_support_reads_the_engine_now(monkeypatch):
    monkeypatch.setitem(models.FAMILIES, "qwen3", "epo_tui.engine.models.llama")
    monkeypatch.setattr(sae, "SUPPORTED", ("standard", "transcoder"))
    support = registry.current_support()
    assert "qwen3" in support.model_types and support.architectures == {"standard", "transcoder"}
    assert support.hook_ok("hook_resid_post") and support.hook_ok("mlp.hook_in")
    assert not support.hook_ok("hook_embed") and not support.hook_ok("attn.hook_q")
    monkeypatch.delattr(sae, "SUPPORTED")  # an engine without the name: nothing loads, no crash
    assert registry.current_support().architectures == frozenset()


def test_reasons_in_order():
    support = registry.Support(frozenset({"gpt2"}), frozenset({"standard"}),
                               lambda hook: hook == "hook_resid_pre")
    kind = registry.Kind("standard", "hook_resid_pre")
    assert registry.why_not("gpt2-small", kind, support) is None
    assert registry.why_not("not-a-model", kind, support) == registry.UNKNOWN_MODEL
    assert registry.why_not("mistral-7b", kind, support) == "model type mistral"
    assert registry.why_not("gpt2-small", registry.Kind("topk", "x"), support) == "architecture topk"
    assert registry.why_not("gpt2-small", registry.Kind("standard", "x"), support) == "hook x"


# ----------------------------------------------------------------------------------------------
# The command


def test_cli_table(directory):
    code, out, err = run_cli("registry")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[2] == "release                                   SAEs  loaded  kinds; why not loaded"
    assert max(map(len, lines)) <= REGISTRY_WIDTH
    res_jb = len(directory["gpt2-small-res-jb"].saes_map)
    assert f"  {'gpt2-small-res-jb':<38} {res_jb:>5}  {res_jb:>6}  standard" in lines
    assert "gpt2-small (gpt2: family gpt2; 0.2 GB in bf16)" in lines
    total = sum(len(lookup.saes_map) for lookup in directory.values())
    assert any(line.startswith("loaded: ") and f" of {total:,} SAEs (" in line for line in lines)


def test_cli_json(directory):
    code, out, _ = run_cli("registry", "--json")
    assert code == 0
    report = json.loads(out)
    assert {"sae_lens_version", "supported", "releases", "total"} <= report.keys()
    assert {"saes", "loaded", "share", "not_loaded"} <= report["total"].keys()
    release = next(r for r in report["releases"] if r["release"] == "gemma-scope-2-27b-pt-res")
    assert {"model", "model_type", "family", "weights_gb_bf16", "kinds", "saes", "loaded", "not_loaded"} <= \
        release.keys()
    assert release["model_type"] == "gemma3" and release["weights_gb_bf16"] == pytest.approx(54.8)


def test_cli_release_filter(directory):
    code, out, _ = run_cli("registry", "--json", "--release", "RES-JB")
    assert code == 0
    names = {r["release"] for r in json.loads(out)["releases"]}
    assert names == {name for name in directory if "res-jb" in name}


def test_cli_unknown_release_is_one_line(directory):
    code, out, err = run_cli("registry", "--release", "no-such-release-xyz")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--release: no release name contains 'no-such-release-xyz'" in err
