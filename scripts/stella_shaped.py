"""Build a random-weight model folder laid out exactly like Stella v5 (Qwen2 flavour), at any size.

Stella's weights cannot be downloaded here, so the Stella code path (prompts config, ``2_Dense_*`` MRL heads,
mean pooling, ``modules.json`` wiring ``2_Dense_1024``) is exercised on folders built by this script: tiny ones
in the tests, full-size shapes (hidden 1536, 28 layers, ...) for honest GPU throughput figures.

    python scripts/stella_shaped.py /tmp/tiny-stella                 # the tests' tiny shape
    python scripts/stella_shaped.py /tmp/stella-1.5b-shape --full    # stella_en_1.5B_v5 shapes, random weights
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

S2P_QUERY = "Instruct: Given a web search query, retrieve relevant passages that answer the query.\nQuery: "
S2S_QUERY = "Instruct: Retrieve semantically similar text.\nQuery: "

FULL_1_5B = dict(
    hidden=1536,
    layers=28,
    heads=12,
    kv_heads=2,
    intermediate=8960,
    vocab_size=151646,
    head_dims=(256, 768, 1024, 2048, 4096, 6144, 8192),
)

_CORPUS = [
    "Vector search finds the passages nearest to a query embedding.",
    "FAISS builds exact and approximate indexes over dense vectors.",
    "SQLite keeps documents, passages and their metadata in one file.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Matryoshka representation learning trains nested embedding heads.",
    "Instruct: Given a web search query, retrieve relevant passages that answer the query.",
    "Query: what is the capital of France? Paris is the capital and largest city of France.",
    "Instruct: Retrieve semantically similar text.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] { } - _ / ' \" appear in text.",
]


# Stella v5 1.5B runs gte-Qwen2's own modeling code (trust_remote_code): a Qwen2 whose attention is
# bidirectional. The shaped folder carries the same kind of code, so that loading it goes through
# trust_remote_code and every token attends to the whole passage, as in Stella.
MODELING = '''"""Bidirectional Qwen2, as Stella v5 1.5B (gte-Qwen2 code) uses it: no causal mask, padding masked."""

from transformers import Qwen2Model
from transformers.masking_utils import create_bidirectional_mask


class BidirectionalQwen2Model(Qwen2Model):
    def __init__(self, config):
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if not isinstance(attention_mask, dict):
            # positional: the embeddings' keyword was input_embeds before transformers 5.9, inputs_embeds since
            attention_mask = {"full_attention": create_bidirectional_mask(self.config, inputs_embeds, attention_mask)}
        return super().forward(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
'''


def _tokenizer(out: Path, vocab_size: int, texts: list[str] | None = None, vocab: int = 2000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, vocab),
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts or _CORPUS * 20, trainer)
    # like gte-Qwen2, which Stella 1.5B derives from: an end-of-text token closes every input
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tokenizer.token_to_id(eos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=eos, model_max_length=512)
    fast.save_pretrained(out)
    return fast


def build_stella_shaped(
    out: Path,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int = 600,
    head_dims: tuple[int, ...] = (256, 768, 1024),
    default_dim: int = 1024,
    seed: int = 0,
    tokenizer_texts: list[str] | None = None,
    tokenizer_vocab: int = 2000,
) -> Path:
    """Write a Stella-v5-shaped sentence-transformers folder with random weights to ``out``.

    The byte-level BPE tokenizer is trained on ``tokenizer_texts`` (default: a few sentences) up to
    ``tokenizer_vocab`` tokens: trained on real corpora with a vocabulary in the tens of thousands, it cuts
    English at a granularity comparable to a word-piece model's (msmarco at 32k: 76.8 tokens per passage,
    MiniLM's WordPiece 81.8); Stella's own Qwen2 tokenizer could not be measured here.
    """
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense
    from transformers import Qwen2Config, Qwen2Model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(out, vocab_size, tokenizer_texts, tokenizer_vocab)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=max(vocab_size, len(tokenizer)),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max(512, 1024),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.auto_map = {"AutoModel": "modeling_stella_shaped.BidirectionalQwen2Model"}
    Qwen2Model(config).save_pretrained(out)
    (out / "modeling_stella_shaped.py").write_text(MODELING)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": hidden,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_cls_token": False,
                "pooling_mode_max_tokens": False,
            }
        )
    )
    for dim in head_dims:
        (out / f"2_Dense_{dim}").mkdir(exist_ok=True)
        Dense(hidden, dim, bias=True, activation_function=torch.nn.Identity()).save(str(out / f"2_Dense_{dim}"))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {
            "idx": 2,
            "name": "2",
            "path": f"2_Dense_{default_dim}",
            "type": "sentence_transformers.models.Dense",
        },
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "config_sentence_transformers.json").write_text(
        json.dumps(
            {"prompts": {"s2p_query": S2P_QUERY, "s2s_query": S2S_QUERY}, "default_prompt_name": None},
            indent=2,
        )
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--full", action="store_true", help="stella_en_1.5B_v5 shapes (about 6 GB of fp32)")
    args = parser.parse_args()
    print(build_stella_shaped(args.out, **(FULL_1_5B if args.full else {})))
