"""benchmarks/fullsize.py's config-only folders of Qwen-Image, FLUX.2-dev, FLUX.2-klein-4B / -9B and Z-Image: each
builds in seconds on the meta device, names the pipeline and component classes of its release, and its transformer
and text encoder have the published parameter counts. Nothing is downloaded; no weight is written."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import fullsize  # noqa: E402

# (writer, keyword arguments, model_index.json's pipeline class, its components)
FOLDERS = {
    "qwen-image": (fullsize.write_qwen_image, {}, "QwenImagePipeline",
                   {"transformer": "QwenImageTransformer2DModel", "vae": "AutoencoderKLQwenImage",
                    "text_encoder": "Qwen2_5_VLForConditionalGeneration", "tokenizer": "Qwen2Tokenizer"}),
    "flux2-dev": (fullsize.write_flux2_dev, {}, "Flux2Pipeline",
                  {"transformer": "Flux2Transformer2DModel", "vae": "AutoencoderKLFlux2",
                   "text_encoder": "Mistral3ForConditionalGeneration", "tokenizer": "PixtralProcessor"}),
    "flux2-klein-4b": (fullsize.write_flux2_klein, {"size": "4b"}, "Flux2KleinPipeline",
                       {"transformer": "Flux2Transformer2DModel", "vae": "AutoencoderKLFlux2",
                        "text_encoder": "Qwen3ForCausalLM", "tokenizer": "Qwen2TokenizerFast"}),
    "flux2-klein-9b": (fullsize.write_flux2_klein, {"size": "9b"}, "Flux2KleinPipeline",
                       {"transformer": "Flux2Transformer2DModel", "vae": "AutoencoderKLFlux2",
                        "text_encoder": "Qwen3ForCausalLM", "tokenizer": "Qwen2TokenizerFast"}),
    "z-image": (fullsize.write_z_image, {}, "ZImagePipeline",
                {"transformer": "ZImageTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "Qwen3Model",
                 "tokenizer": "Qwen2Tokenizer"}),
}

# Published sizes in billions, as their sources round them: a figure given to d decimals holds the true count
# within half a unit of its last digit, which is the tolerance each check allows (no other slack).
#   Qwen-Image: 20.43 B (Qwen/Qwen-Image's transformer shards, 40.86 GB of bf16); Qwen2.5-VL-7B-Instruct: 8.29 B
#   (its safetensors, vision tower included); FLUX.2-dev: "32 billion parameter" (BFL's model card);
#   Mistral-Small-3.1-24B-Instruct-2503: 24.0 B (its safetensors, Pixtral tower included); FLUX.2-klein-4B / -9B:
#   4 B / 9 B (BFL's names); Qwen3-4B: 4.0 B, 3.6 B without embeddings; Qwen3-8B: 8.2 B, 6.95 B without embeddings
#   (Qwen's model cards); Z-Image: 6.15 B (Tongyi-MAI's report).
PUBLISHED = {
    "qwen-image": {"transformer": ("20.43",), "text_encoder": ("8.29",)},
    "flux2-dev": {"transformer": ("32",), "text_encoder": ("24.0",)},
    "flux2-klein-4b": {"transformer": ("4",), "text_encoder": ("4.0", "3.6")},
    "flux2-klein-9b": {"transformer": ("9",), "text_encoder": ("8.2", "6.95")},
    "z-image": {"transformer": ("6.15",), "text_encoder": ("4.0", "3.6")},
}
# the text encoders' input (and, untied, output) embedding rows x width: what a count "without embeddings" leaves out
EMBEDDINGS = {"flux2-klein-4b": 151936 * 2560, "flux2-klein-9b": 2 * 151936 * 4096, "z-image": 151936 * 2560}
BUILD_SECONDS = 20  # "in seconds": every folder here takes 1-4 s on a 2-core CI machine


def _near(count: int, figure: str) -> bool:
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    return abs(count / 1e9 - float(figure)) <= 0.5 * 10 ** -decimals


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("fullsize"), {}
    for name, (writer, kw, _, _) in FOLDERS.items():
        t0 = time.time()
        out[name] = (writer(root / name, weights=False, **kw), time.time() - t0)
    return out


@pytest.mark.parametrize("name", list(FOLDERS))
def test_config_only_folder(folders, name):
    folder, seconds = folders[name]
    _, kw, pipeline, parts = FOLDERS[name]
    assert seconds < BUILD_SECONDS, f"{name}: {seconds:.1f} s"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    assert {k: index[k][1] for k in parts} == parts
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    if pipeline == "Flux2KleinPipeline":
        assert index["is_distilled"] is True
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in written if p.suffix in (".safetensors", ".bin")], "config-only folder holds weights"
    for part in ("transformer", "text_encoder", "vae"):
        assert (folder / part / "config.json").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").is_file()


@pytest.mark.parametrize("name", list(FOLDERS))
def test_published_parameter_counts(folders, name):
    counts = json.loads((folders[name][0] / "parameter_counts.json").read_text())
    transformer, = PUBLISHED[name]["transformer"]
    assert _near(counts["transformer"], transformer), (name, counts["transformer"])
    total, *without_embeddings = PUBLISHED[name]["text_encoder"]
    assert _near(counts["text_encoder"], total), (name, counts["text_encoder"])
    for figure in without_embeddings:
        assert _near(counts["text_encoder"] - EMBEDDINGS[name], figure), (name, counts["text_encoder"])


@pytest.mark.parametrize("name", ["qwen-image", "flux2-klein-4b", "z-image"])
def test_qwen_tokenizer_loads_as_named(folders, name):
    """The tokenizer loads through the class model_index.json names, is above the library's 100-token floor, keeps
    Qwen's chat markers whole and writes the empty think block Qwen3's template adds without thinking."""
    import transformers

    folder = folders[name][0]
    cls = getattr(transformers, json.loads((folder / "model_index.json").read_text())["tokenizer"][1])
    tok = cls.from_pretrained(folder / "tokenizer")
    assert len(tok) > 100
    assert len(tok("<|im_start|>user<|im_end|>").input_ids) == 1 + len(tok("user").input_ids) + 1
    text = tok.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_mistral_tokenizer_pads_the_chat_template(folders):
    """FLUX.2-dev's processor folder: its tokenizer (AutoTokenizer; the PixtralProcessor around it needs
    torchvision) applies the system + user template to text parts and pads with <pad> to the length asked."""
    from transformers import AutoTokenizer

    folder = folders["flux2-dev"][0] / "tokenizer"
    assert json.loads((folder / "processor_config.json").read_text())["patch_size"] == 14
    tok = AutoTokenizer.from_pretrained(folder)
    msgs = [[{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "a cat"}]}]]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, padding="max_length", truncation=True,
                                  max_length=40)
    ids, mask = out["input_ids"][0], out["attention_mask"][0]
    n = sum(mask)
    assert len(ids) == 40 and 0 < n < 40 and set(ids[n:]) == {tok.pad_token_id}
    assert tok.decode(ids[:n]) == "<s>[SYSTEM_PROMPT]be brief[/SYSTEM_PROMPT][INST]a cat[/INST]"


@pytest.mark.parametrize("name", list(FOLDERS))
def test_written_configs_rebuild_the_counted_networks(folders, name):
    """What `flashdmd plan` builds from the folder (each config.json, on the meta device) is the network counted when
    the folder was written: the saved configs lose nothing of the constants."""
    import torch

    from flashdmd.families.parts import meta_component

    folder = folders[name][0]
    index = json.loads((folder / "model_index.json").read_text())
    counts = json.loads((folder / "parameter_counts.json").read_text())
    for part in ("transformer", "text_encoder", "vae"):
        net = meta_component(folder, index, part, torch.bfloat16)
        assert sum(p.numel() for p in net.parameters()) == counts[part], (name, part)
