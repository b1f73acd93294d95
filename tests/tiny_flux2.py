"""Tiny random FLUX.2 pipelines built from the real classes (no hub access).

* :func:`qwen_tokenizer` -- a real-format Qwen2Tokenizer (byte-level BPE vocab.json + merges.txt, Qwen's special
  tokens and a Qwen3-style chat template that honours ``enable_thinking``), 520 tokens.
* :func:`mistral_processor` -- a byte-level BPE tokenizer.json with Mistral's control tokens and a Mistral-style chat
  template (system prompt, [INST]) in a PreTrainedTokenizerFast (the published PixtralProcessor's text path).
* :func:`klein_pipeline` -- Flux2KleinPipeline: Flux2Transformer2DModel (1 double + 2 single blocks, 16 packed
  channels, no guidance embedding), Qwen3ForCausalLM (27 layers, hidden 16: layers 9, 18, 27 exist), the FLUX.2
  VAE (factor 2, 4 latent channels, random batch-norm statistics), FLUX.2's FlowMatchEuler scheduler config.
* :func:`dev_pipeline` -- Flux2Pipeline: the same transformer with the guidance embedding, a tiny
  Mistral3ForConditionalGeneration (30 text layers, a 1-layer Pixtral vision tower).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import tiny_models as tm

TEXT_HIDDEN = 16  # x 3 stacked layers = the transformer's joint_attention_dim 48
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
QWEN_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                 "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
                 "{%- endif %}{%- endif %}")
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                    "[IMG_BREAK]", "[IMG_END]", "<pad>"]
MISTRAL_TEMPLATE = ("{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'system' %}"
                    "{{- '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}"
                    "{%- elif message['role'] == 'user' %}{{- '[INST]' + message['content'][0]['text'] + '[/INST]' }}"
                    "{%- endif %}{%- endfor %}")


def _byte_bpe(folder: Path, specials: list[str]) -> tuple[Path, Path]:
    """Byte-level BPE vocab.json + merges.txt: 256 byte chars, a few merges, then ``specials``."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = tm._bytes_to_unicode()
    merges = [("t", "h"), ("th", "e"), ("Ġ", "a"), ("i", "n")]
    tokens = chars + [a + b for a, b in merges] + specials
    vocab, merge_file = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merge_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab, merge_file


def qwen_tokenizer(folder: Path):
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_bpe(Path(folder), QWEN_SPECIALS)
    tok = Qwen2Tokenizer(vocab=str(vocab), merges=str(merges), unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=32768)
    tok.chat_template = QWEN_TEMPLATE
    return tok


def mistral_processor(folder: Path):
    """Mistral-Small-3.1's tokenizer format (a byte-level BPE tokenizer.json in a PreTrainedTokenizerFast, Mistral's
    control tokens, a Mistral-style chat template over content lists). The published folder wraps it in a
    PixtralProcessor, whose text path is this tokenizer's apply_chat_template; the processor class itself needs
    torchvision, which the test environment does not install."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_bpe(Path(folder), [])
    bpe = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(MISTRAL_SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=131072)
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def qwen3_encoder(tok, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=27,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


def mistral3_encoder(processor, seed: int = 0):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = processor
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=32,
                num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=1024, pad_token_id=tok.pad_token_id)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=8, image_size=32, patch_size=8)
    cfg = Mistral3Config(text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                         spatial_merge_size=2, vision_feature_layer=-1)
    torch.manual_seed(seed)
    return Mistral3ForConditionalGeneration(cfg).eval()


def flux2_transformer(seed: int = 0, guidance_embeds: bool = False):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN,
                                   timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                                   guidance_embeds=guidance_embeds)


def flux2_vae(seed: int = 0, blocks: int = 2):
    """AutoencoderKLFlux2 of factor 2 (``blocks`` 2; 1: factor 1), 4 latent channels; its batch-norm running
    statistics (over the 16 patchified channels) random, so that the normalisation is visible."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=[8, 16][:blocks], down_block_types=["DownEncoderBlock2D"] * blocks,
                             up_block_types=["UpDecoderBlock2D"] * blocks, layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=32)
    g = torch.Generator().manual_seed(seed + 7)
    vae.bn.running_mean.copy_(torch.randn(16, generator=g) * 0.5)
    vae.bn.running_var.copy_(torch.rand(16, generator=g) * 2 + 0.25)
    return vae.eval()


def flux2_scheduler():
    """FLUX.2's published scheduler config (FlowMatchEulerDiscreteScheduler, dynamic exponential shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096,
                                           time_shift_type="exponential")


def klein_pipeline(tmp: Path, seed: int = 0, vae_blocks: int = 2, is_distilled: bool = False):
    from diffusers import Flux2KleinPipeline

    tok = qwen_tokenizer(Path(tmp) / "qwen_vocab")
    return Flux2KleinPipeline(scheduler=flux2_scheduler(), vae=flux2_vae(seed, vae_blocks),
                              text_encoder=qwen3_encoder(tok, seed + 20), tokenizer=tok,
                              transformer=flux2_transformer(seed), is_distilled=is_distilled)


def dev_pipeline(tmp: Path, seed: int = 0, vae_blocks: int = 2):
    from diffusers import Flux2Pipeline

    processor = mistral_processor(Path(tmp) / "mistral_vocab")
    return Flux2Pipeline(scheduler=flux2_scheduler(), vae=flux2_vae(seed, vae_blocks),
                         text_encoder=mistral3_encoder(processor, seed + 20), tokenizer=processor,
                         transformer=flux2_transformer(seed, guidance_embeds=True))


def saved(pipe, folder: Path) -> Path:
    return tm.save_pipeline(pipe, folder)


def run_folders(tmp: Path) -> dict:
    """{"flux2-klein", "flux2"} -> tiny Flux2KleinPipeline and Flux2Pipeline folders (the runs' teachers)."""
    tmp = Path(tmp)
    return {"flux2-klein": saved(klein_pipeline(tmp), tmp / "flux2_klein"), "flux2": saved(dev_pipeline(tmp), tmp / "flux2")}
