"""Small real-format tokenizers for the language-model text encoders of benchmarks/fullsize.py (no hub access).

Like tests/tiny_models.py's CLIP and T5 tokenizers: the real tokenizer classes and file formats, a vocabulary just
above the library's 100-token sanity floor, while the text encoders keep their real vocabulary sizes.

* :func:`qwen2_tokenizer` -- Qwen2Tokenizer (byte-level BPE: the 256 byte symbols, a few merges, Qwen's special
  tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<think>`` ... and the Qwen2.5-VL vision markers)
  with a Qwen3-style chat template (``enable_thinking=False`` writes the empty think block as Qwen3's does): the
  tokenizer of Qwen-Image, FLUX.2-klein and Z-Image.
* :func:`write_pixtral_processor` -- a PixtralProcessor folder (Mistral-Small-3.1's: patch 14, spatial merge 2) over a byte-level
  BPE fast tokenizer with Mistral's control tokens (``<s>``, ``[INST]``, ``[SYSTEM_PROMPT]``, ``[IMG]`` ...) and a
  Mistral-style chat template that reads text content parts: the ``tokenizer`` of FLUX.2-dev.
"""
from __future__ import annotations

MERGES = [("t", "h"), ("Ġ", "a"), ("Ġ", "th"), ("i", "n"), ("e", "r")]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<pad>",
                    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]

# Qwen3's template, reduced to what an image pipeline sends: system / user / assistant turns, a generation prompt,
# and the empty think block that ``enable_thinking=False`` adds
QWEN_CHAT_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['content'] is string %}{{ m['content'] }}{%- else %}"
    "{%- for part in m['content'] %}{%- if part['type'] == 'text' %}{{ part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{ '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")

# Mistral-Small-3.1's template, reduced to text parts: [SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for m in messages %}{%- if m['content'] is string %}{%- set text = m['content'] %}"
    "{%- else %}{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{%- endif %}"
    "{%- if m['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif m['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{ text + eos_token }}{%- endif %}{%- endfor %}")


def _byte_level_vocab(specials: list[str], specials_first: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 256 GPT-2 byte symbols, the merges' products and ``specials`` (first, as Mistral's control tokens are,
    or last, as Qwen's are): (vocab, merges)."""
    from flashdmd.world.tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    tokens = [table[b] for b in range(256)] + [a + b for a, b in MERGES]
    tokens = specials + tokens if specials_first else tokens + specials
    return {t: i for i, t in enumerate(tokens)}, list(MERGES)


def qwen2_tokenizer():
    """A Qwen2Tokenizer (271 tokens) with Qwen's special tokens and a Qwen3-style chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level_vocab(QWEN_SPECIALS, specials_first=False)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=131072)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                          for t in QWEN_SPECIALS[1:]]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def mistral_tokenizer():
    """A byte-level BPE PreTrainedTokenizerFast (272 tokens) with Mistral's control tokens; pads with ``<pad>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_level_vocab(MISTRAL_SPECIALS, specials_first=True)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MISTRAL_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=131072, chat_template=MISTRAL_CHAT_TEMPLATE)


def write_pixtral_processor(folder) -> list:
    """Write a PixtralProcessor folder as Mistral-Small-3.1 ships it (processor_config.json: patch 14, spatial merge
    2; preprocessor_config.json: CLIP mean / std, longest edge 1540, the rest PixtralImageProcessor's defaults -- the
    published files themselves were not found; the :func:`mistral_tokenizer` files and the chat template) and return
    model_index.json's entry for it. Written file by file, not by
    ``PixtralProcessor.save_pretrained``: transformers builds a PixtralProcessor only where torchvision is installed
    (loading the folder needs it too; ``AutoTokenizer`` loads its tokenizer without)."""
    import json
    from pathlib import Path

    from transformers import PixtralImageProcessorPil

    folder = Path(folder)
    mistral_tokenizer().save_pretrained(folder)
    images = PixtralImageProcessorPil(patch_size={"height": 14, "width": 14}, size={"longest_edge": 1540}).to_dict()
    images.update(image_processor_type="PixtralImageProcessor", processor_class="PixtralProcessor")
    (folder / "preprocessor_config.json").write_text(json.dumps(images, indent=2, sort_keys=True) + "\n")
    processor = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
                 "patch_size": 14, "processor_class": "PixtralProcessor", "spatial_merge_size": 2}
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return ["transformers", "PixtralProcessor"]
