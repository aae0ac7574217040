"""Tiny random captioning models of the real transformers classes, saved as model folders.

The `caption` command loads models by path (local_files_only), so the tests save these folders to
a tmp dir: LLaVA-1.5 (ShareGPT4V's architecture, `LlavaForConditionalGeneration`), Video-LLaVA
(`VideoLlavaForConditionalGeneration`), Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`: image and video) and a causal LM for the merge (`LlamaForCausalLM`). Weights are random, so their text is
random words; the tests check the plumbing, never the words. The tokenizer is a word-level one
built here (no download): a few hundred words plus each model family's special tokens.
"""
from __future__ import annotations

from pathlib import Path

WORDS = ("a the man woman person young old with short long brown blond black hair glasses beard "
         "smiles talks turns head nods looks camera left right laughs speaks and is his her wearing "
         "shirt jacket red blue white green face eyes open mouth slowly then while standing sitting "
         "indoors outdoors light dark background happy serious").split()
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<video>", "USER:", "ASSISTANT:",
           "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>", "user", "assistant", "system"]
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=4096)
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=28, patch_size=14, projection_dim=32)


def word_tokenizer():
    """A fast word-level tokenizer: the words above, the special tokens, whitespace splitting."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS + list(",.:!?"))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with blanks
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL[4:]]})
    return tokenizer


def _text_config(tokenizer) -> dict:
    return dict(TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _save(model, processor, folder: Path) -> Path:
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_llava(folder: Path, seed: int = 0) -> Path:
    """LLaVA-1.5 layout: CLIP vision tower, 2-layer MLP projector, Llama text model."""
    import torch
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = word_tokenizer()
    config = LlavaConfig(vision_config=dict(CLIP_VISION, model_type="clip_vision_model"),
                         text_config=dict(_text_config(tokenizer), model_type="llama"),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return _save(model, processor, folder)


def write_video_llava(folder: Path, seed: int = 0) -> Path:
    """Video-LLaVA layout: one CLIP-like tower for 8-frame videos (and images), Llama text model."""
    import torch
    from transformers import (VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor,
                              VideoLlavaProcessor)

    tokenizer = word_tokenizer()
    config = VideoLlavaConfig(vision_config=dict(CLIP_VISION, model_type="clip_vision_model"),
                              text_config=dict(_text_config(tokenizer), model_type="llama"),
                              image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                              video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                              vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config).eval()
    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    kwargs = {}
    try:
        from transformers import VideoLlavaVideoProcessor

        kwargs["video_processor"] = VideoLlavaVideoProcessor(size={"shortest_edge": 28},
                                                             crop_size={"height": 28, "width": 28})
    except ImportError:
        pass
    processor = VideoLlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                    **kwargs)
    return _save(model, processor, folder)


def write_qwen2_vl(folder: Path, seed: int = 0) -> Path:
    """Qwen2-VL layout: a native-resolution vision tower for images and videos, Qwen2 text model."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tokenizer = word_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = dict(_text_config(tokenizer), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [2, 3, 3]})
    config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2,
                                                                mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                                                                temporal_patch_size=2),
                           image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                           vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                                 video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=tokenizer)
    return _save(model, processor, folder)


def write_qwen2_5_vl(folder: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL layout (windowed vision attention); it reuses Qwen2-VL's image and video processors."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tokenizer = word_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = dict(_text_config(tokenizer), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                              vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                                    video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=tokenizer)
    return _save(model, processor, folder)


def write_causal_lm(folder: Path, seed: int = 0) -> Path:
    """A causal LM for the merge (Llama layout) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**_text_config(tokenizer))).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
