"""The Wan2.1-layout building blocks of the shipped demo model, with random weights from the current torch seed.

A word-level tokenizer over the micro-world's vocabulary, a small UMT5 text encoder and a small
``WanTransformer3DModel``. The demo-model recipe (``training.demo``) builds its pipeline from them; the tiny
test pipelines (``microverse.tools.tiny``) reuse them at smaller sizes.
"""

from __future__ import annotations

#: Words the tokenizer knows, in token-id order; anything else maps to ``<unk>``.
VOCAB_WORDS = (  # noqa: SIM905 - one sentence-like string reads better than 130 quoted words
    "a an the of in on to into and with from by at as is are two one cell cells divides dividing "
    "daughter mitosis dna replication fork helix blood red flowing flow vessel right left up down "
    "particles particle diffusing diffusion brownian bacteria bacterium swimming toward source "
    "chemotaxis vesicle vesicles moving along filament microtubule apoptosis shrinking blebbing "
    "membrane nucleus organ heart beating tissue mitochondria protein fluorescence microscopy "
    "brightfield green bright dark slow fast video of time lapse process molecule molecules "
    "apoptotic bacterial bottom capillary chemical dying motion shrinks that through top transport"
).split()


def build_tokenizer(max_length: int = 32):
    """A word-level tokenizer (``tokenizers``) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in VOCAB_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="removed")]
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def build_text_encoder(vocab_size: int, dim: int, layers: int):
    """A small ``UMT5EncoderModel`` (random weights from the current torch seed) for the word tokenizer."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size,
            d_model=dim,
            d_kv=max(dim // 4, 4),
            d_ff=dim * 2,
            num_layers=layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def build_transformer(z_dim: int, text_dim: int, freq_dim: int, ffn_dim: int, num_layers: int, num_heads: int,
                      head_dim: int, in_channels: int | None = None, image_dim: int | None = None):
    """A small ``WanTransformer3DModel`` (Wan2.1's layout, random weights from the current torch seed).

    ``in_channels`` (default ``z_dim``): latent plus conditioning channels (Wan2.1 I2V: ``2 z_dim + 4``);
    ``image_dim``: width of the CLIP image embeddings its cross-attention also reads (Wan2.1 I2V), or None."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        in_channels=in_channels or z_dim,
        image_dim=image_dim,
        added_kv_proj_dim=num_heads * head_dim if image_dim else None,
        out_channels=z_dim,
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
