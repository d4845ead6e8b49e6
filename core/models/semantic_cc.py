"""Semantic-CC (Zhu, Li, Chen, Liu, Zhou & Shi, "Semantic-CC: Boosting Remote Sensing Image Change
Captioning via Foundational Knowledge and Semantic Guidance", seed paper 001).

Components, in the paper's order (Eq. 1):

* **bi-temporal SAM-based encoder** (Sec. III-B): SAM's ViT image encoder (:class:`..vit.SamViT`) run on
  both dates at once, with LoRA (r = 16, alpha = 32, dropout 0.05, no bias) on the qkv projection of every
  block, and a **BCSF** (Eq. 2-3) after each of the four global-attention blocks: a spatial filter shared
  by both dates and one channel filter per date, ``Phi(x, y) = x * sigmoid(proj(cat(x, y)))``, each
  followed by its own FFN, ``F_k = F_k + F_k^sf + F_k^cf``. CD uses SAM's neck output (c -> 256); captioning
  uses the un-reduced c-channel features.
* **multi-task semantic aggregation neck** (Sec. III-C, Eq. 4-5), 3 units: intra-task self-attention (a
  Transformer layer per task) and inter-task attention by bilinear similarity ``S = X1^T W X2``,
  ``dX2 = X2 * sigmoid(S)``, ``sigmoid(proj(cat(X1, dX2)))`` added to the task's features.
* **multi-scale CD decoder** (Sec. III-D, Eq. 6): the two dates' CD features concatenated, SimpleFPN
  (ViTDet) to strides 4/8/16/32 with 512 channels, a conv per scale, bilinear resize to stride 4, concat,
  1x1 conv to the classes, upsampled to the tile.
* **change caption decoder** (Sec. III-E, Eq. 7-8): a BLIP-2/MiniGPT-4 Q-Former (HF transformers'
  ``Blip2QFormerModel``, 32 queries, shared by both dates), the change semantic feature enhancer (Eq. 8)
  after it, and a causal LLM (Vicuna-7B in the paper) reached through a MiniGPT-4 prompt template, with
  LoRA on its attention through ``peft``. Captions come from the LLM's ``generate`` (greedy in the paper;
  beam search available), see :meth:`SemanticCC.generate_captions`.

Where the weights come from (nothing is ever downloaded):

* ``sam_checkpoint``: a LOCAL SAM checkpoint (e.g. the official ``sam_vit_l_0b3195.pth``, loaded weights-only,
  or a .safetensors export) - its ``image_encoder.*`` tensors fill the encoder;
* ``llm_path``: a LOCAL Hugging Face folder with the LLM and its tokenizer (e.g. Vicuna-7B v0 as used by
  MiniGPT-4: ``config.json``, ``*.safetensors``, ``tokenizer.model``...), loaded with
  ``local_files_only=True``. Real captioning needs that tokenizer; without ``llm_path`` the LLM is built
  at random from the ``llm_*`` fields and the word-level :class:`~changescribe.core.vocabulary.Vocabulary`
  serves as its tokenizer (fine for tests and word-level training, not for a pretrained LLM).
* With either path set, the model file stores only what training changed (LoRA factors, BCSF, neck,
  decoders, Q-Former, enhancer): the frozen SAM / LLM tensors are re-read from the paths at load time.
* ``qformer_checkpoint``: a LOCAL BLIP-2 / MiniGPT-4 Q-Former checkpoint (``blip2_pretrained_flant5xxl.pth``, the
  file MiniGPT-4 takes its Q-Former from, LAVIS layout; or a Hugging Face BLIP-2 export) - it fills the Q-Former,
  its query tokens and ``ln_vision`` (key mapping in :mod:`.pretrained`). With ``freeze_pretrained`` these stay
  frozen and, like SAM's tensors, out of the model file (re-read at load time); otherwise they only initialise
  training and the model file carries the trained ones.
* ``qformer_encoder_width``: the pretrained Q-Former cross-attends to EVA ViT-g's 1408-wide tokens, SAM ViT-L
  gives 1024. The paper says the Q-Former "inherits" MiniGPT-4's weights without saying how the widths meet; we
  put a learned linear map (``vision_proj``, embed_dim -> 1408) before ``ln_vision`` so every pretrained tensor
  loads unchanged (the paper configurations set 1408). ``None`` (the small config): no map, the Q-Former reads the
  encoder's width.

Documented interpretations: BCSF channel filters need a fixed token grid for their ``2*h*w -> 1``
projection (``bcsf_grid``, 16 = 256 px tiles); other tile sizes are average-pooled to it for the gate
only. BCSF FFNs are Linear-GELU-Linear of width ``bcsf_ffn_ratio * c`` with the last layer zero-initialised,
so an untrained BCSF leaves SAM's features unchanged. ``S = X1^T W X2`` is read as the per-pixel bilinear
form (the diagonal), which is what makes ``X2 * sigmoid(S)`` a pixel-wise product as the paper states.
The LLM's LoRA targets ``q_proj`` and ``v_proj`` (peft's default for LLaMA). Test-time multi-output
ensembling is not implemented.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PreNormBlock
from .pix4cap import conv_bn_relu
from .network import ChangeNetwork
from .pretrained import load_qformer, read_checkpoint
from .vit import SAM_VARIANTS, LayerNorm2d, SamViT, load_sam_encoder

WEIGHTS_NOTE = (
    "Semantic-CC weights are never downloaded. Put SAM's image-encoder checkpoint (e.g. sam_vit_l_0b3195.pth "
    "or a .safetensors export) on this machine and set the config's 'sam_checkpoint' to its path; put the LLM "
    "as a Hugging Face folder (config.json, weights, tokenizer files; Vicuna-7B v0 as in MiniGPT-4) on this "
    "machine and set 'llm_path' to it. For MiniGPT-4's Q-Former set 'qformer_checkpoint' to a local "
    "blip2_pretrained_flant5xxl.pth (or a Hugging Face BLIP-2 export). The model file then holds only the trained "
    "tensors and re-reads the frozen ones from those paths; captions use the LLM folder's tokenizer.")

INSTRUCTIONS = (
    "Describe the difference between the new remote sensing image and the old one in detail.",
    "What is the main change between the two remote sensing scenes? Describe it in detail.",
    "Please provide a detailed description of the difference between these two remote sensing pictures.",
    "Can you describe what has been changed between these two remote sensing pictures for me?",
)
# MiniGPT-4 (Vicuna v0) conversation template; <ImageHere> is replaced by the enhanced query tokens.
PROMPT_TEMPLATE = "###Human: <Img><ImageHere></Img> {instruction} ###Assistant: "


@dataclass
class SemanticCCConfig:
    in_channels: int = 3
    # ---- SAM image encoder (ViT-L by default, as the paper) ----
    embed_dim: int = 1024
    depth: int = 24
    vit_heads: int = 16
    global_attn_indexes: tuple[int, ...] = (5, 11, 17, 23)
    window: int = 14
    img_size: int = 1024  # SAM's position table; resized to the tile's grid at run time
    patch: int = 16
    neck_channels: int = 256  # SAM neck: the CD features
    sam_checkpoint: str | None = None
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    # ---- BCSF ----
    bcsf_grid: int = 16
    bcsf_ffn_ratio: float = 1.0
    # ---- multi-task semantic aggregation neck ----
    neck_units: int = 3
    neck_mlp_ratio: int = 4
    neck_dim_head: int = 64
    # ---- CD decoder ----
    fpn_channels: int = 512
    cd_channels: int = 512
    num_classes: int = 2
    # ---- caption decoder: Q-Former + enhancer + LLM ----
    num_query_tokens: int = 32
    qformer_hidden: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    qformer_cross_every: int = 2
    qformer_encoder_width: int | None = None  # 1408 = EVA ViT-g, to load BLIP-2's Q-Former (see module doc)
    qformer_checkpoint: str | None = None
    llm_path: str | None = None
    llm_hidden: int = 4096  # Vicuna-7B
    llm_layers: int = 32
    llm_heads: int = 32
    llm_intermediate: int = 11008
    llm_max_positions: int = 2048
    llm_dtype: str = "float32"  # dtype for a pretrained LLM from llm_path (float16 / bfloat16 on GPU)
    vocab_size: int = 32000  # LLaMA/Vicuna tokenizer; the word vocabulary's size without llm_path
    llm_lora_r: int = 16
    llm_lora_alpha: float = 32.0
    llm_lora_dropout: float = 0.05
    llm_lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    instructions: tuple[str, ...] = INSTRUCTIONS
    prompt_template: str = PROMPT_TEMPLATE
    max_caption_length: int = 40
    beam_size: int = 1  # the paper decodes greedily
    cd_loss_weight: float = 0.5  # lambda of Eq. 9 (used by training)
    freeze_pretrained: bool = True


def sam_config(variant: str, **changes: Any) -> SemanticCCConfig:
    """Semantic-CC on SAM's ``vit_b`` / ``vit_l`` / ``vit_h`` encoder sizes."""
    v = SAM_VARIANTS[variant]
    return dataclasses.replace(SemanticCCConfig(), embed_dim=v["embed_dim"], depth=v["depth"], vit_heads=v["heads"],
                               global_attn_indexes=v["global_attn_indexes"], **changes)


# ---- encoder pieces ------------------------------------------------------------------------------------

def _ffn(dim: int, ratio: float) -> nn.Sequential:
    hidden = max(1, int(dim * ratio))
    ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
    nn.init.zeros_(ffn[2].weight)
    nn.init.zeros_(ffn[2].bias)
    return ffn


class BCSF(nn.Module):
    """Bi-temporal change semantic filter (Eq. 2-3) on (2B, h, w, c) tokens (dates stacked on the batch)."""

    def __init__(self, dim: int, grid: int, ffn_ratio: float) -> None:
        super().__init__()
        self.grid = grid
        self.spatial = nn.Linear(2 * dim, 1)  # shared: 2c -> 1 per pixel
        self.channel = nn.ModuleList([nn.Linear(2 * grid * grid, 1) for _ in range(2)])  # per date: 2hw -> 1
        self.ffn_sf = _ffn(dim, ffn_ratio)
        self.ffn_cf = nn.ModuleList([_ffn(dim, ffn_ratio) for _ in range(2)])

    def _channel_view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, c) -> (B, c, grid*grid): the transposed, flattened map the channel filter reads."""
        x = x.permute(0, 3, 1, 2)
        if x.shape[-2:] != (self.grid, self.grid):
            x = F.adaptive_avg_pool2d(x, (self.grid, self.grid))
        return x.flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0] // 2
        x1, x2 = x[:b], x[b:]
        sf1 = x1 * torch.sigmoid(self.spatial(torch.cat([x1, x2], -1)))
        sf2 = x2 * torch.sigmoid(self.spatial(torch.cat([x2, x1], -1)))
        c1, c2 = self._channel_view(x1), self._channel_view(x2)
        cf1 = x1 * torch.sigmoid(self.channel[0](torch.cat([c1, c2], -1)))[:, None, None, :, 0]
        cf2 = x2 * torch.sigmoid(self.channel[1](torch.cat([c2, c1], -1)))[:, None, None, :, 0]
        y1 = x1 + self.ffn_sf(sf1) + self.ffn_cf[0](cf1)
        y2 = x2 + self.ffn_sf(sf2) + self.ffn_cf[1](cf2)
        return torch.cat([y1, y2], 0)


class InterTaskAttention(nn.Module):
    """Eq. 5: bring task-2 features into task 1 through per-pixel bilinear similarity."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.similarity = nn.Bilinear(c1, c2, 1, bias=False)  # W
        self.proj = nn.Linear(c1 + c2, c1)  # the 1x1 convolution, on tokens

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        dx2 = x2 * torch.sigmoid(self.similarity(x1, x2))
        return torch.sigmoid(self.proj(torch.cat([x1, dx2], -1)))


class AggregationUnit(nn.Module):
    """One multi-task semantic aggregation unit (Eq. 4), applied to both tasks symmetrically."""

    def __init__(self, c_cc: int, c_cd: int, mlp_ratio: int, dim_head: int) -> None:
        super().__init__()
        self.intra_cc = PreNormBlock(c_cc, max(1, c_cc // dim_head), min(dim_head, c_cc), mlp_ratio * c_cc, cross=False)
        self.intra_cd = PreNormBlock(c_cd, max(1, c_cd // dim_head), min(dim_head, c_cd), mlp_ratio * c_cd, cross=False)
        self.inter_cc = InterTaskAttention(c_cc, c_cd)
        self.inter_cd = InterTaskAttention(c_cd, c_cc)

    def forward(self, f_cc: torch.Tensor, f_cd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.intra_cc(f_cc), self.intra_cd(f_cd)
        return f_cc + self.inter_cc(a, b), f_cd + self.inter_cd(b, a)


class SimpleFPN(nn.Module):
    """ViTDet's simple feature pyramid from one stride-16 map: strides 4, 8, 16, 32, ``out`` channels each."""

    def __init__(self, cin: int, out: int) -> None:
        super().__init__()
        self.s4 = nn.Sequential(nn.ConvTranspose2d(cin, cin // 2, 2, stride=2), LayerNorm2d(cin // 2), nn.GELU(),
                                nn.ConvTranspose2d(cin // 2, cin // 4, 2, stride=2))
        self.s8 = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.s32 = nn.MaxPool2d(2)
        self.outs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, out, 1, bias=False), LayerNorm2d(out),
                          nn.Conv2d(out, out, 3, padding=1, bias=False), LayerNorm2d(out))
            for c in (cin // 4, cin // 2, cin, cin)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = [self.s4(x), self.s8(x), x, self.s32(x)]
        return [m(f) for m, f in zip(self.outs, maps)]


class MultiScaleChangeDecoder(nn.Module):
    """Eq. 6: cat dates -> SimpleFPN -> conv per scale -> resize to stride 4 -> cat -> 1x1 -> classes."""

    def __init__(self, c_cd: int, fpn: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fpn = SimpleFPN(2 * c_cd, fpn)
        self.refine = nn.ModuleList([conv_bn_relu(fpn, channels) for _ in range(4)])
        self.proj = nn.Conv2d(4 * channels, num_classes, 1)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        maps = [r(m) for r, m in zip(self.refine, self.fpn(torch.cat([f1, f2], 1)))]
        top = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == top else F.interpolate(m, size=top, mode="bilinear", align_corners=False)
                for m in maps]
        y = self.proj(torch.cat(maps, 1))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class ChangeFeatureEnhancer(nn.Module):
    """Eq. 8: gate each date by the other, then project [F1', F2', F1' - F2'] to the LLM width."""

    def __init__(self, dim: int, llm_hidden: int) -> None:
        super().__init__()
        self.proj_1 = nn.Linear(2 * dim, 1)
        self.proj_2 = nn.Linear(2 * dim, 1)
        self.proj = nn.Linear(3 * dim, llm_hidden)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        g1 = f1 * torch.sigmoid(self.proj_1(torch.cat([f1, f2], -1)))
        g2 = f2 * torch.sigmoid(self.proj_2(torch.cat([f2, f1], -1)))
        return self.proj(torch.cat([g1, g2, g1 - g2], -1))


# ---- tokenizers -----------------------------------------------------------------------------------------

class WordTokenizer:
    """The project's word-level Vocabulary as the LLM's tokenizer (tests, word-level training)."""

    def __init__(self, vocabulary: Any) -> None:
        from ..vocabulary import END_ID, PAD_ID, START_ID, UNK_ID, tokenize

        self.vocabulary, self._tokenize, self.unk_id = vocabulary, tokenize, UNK_ID
        self.bos_id, self.eos_id, self.pad_id = START_ID, END_ID, PAD_ID

    def encode(self, text: str) -> list[int]:
        return [self.vocabulary.stoi.get(w, self.unk_id) for w in self._tokenize(text)]

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        return self.vocabulary.decode_batch(ids.cpu())


class HFTokenizer:
    """The LLM's own tokenizer from the local ``llm_path`` folder."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)  # nosec B615
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id
        pad = self.tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.tok.unk_token_id or 0)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        out = []
        for row in ids.tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            out.append(self.tok.decode(row, skip_special_tokens=True).strip())
        return out


# ---- the model --------------------------------------------------------------------------------------------

@dataclass
class SemanticCCFeatures:
    """Output of :meth:`SemanticCC.encode`: neck outputs with both dates stacked on the batch."""

    cc: torch.Tensor  # (2B, h*w, c)
    cd: torch.Tensor  # (2B, h*w, neck_channels)
    grid: tuple[int, int]
    size: tuple[int, int]


def _on_meta() -> bool:
    return torch.get_default_device().type == "meta"


class SemanticCC(ChangeNetwork):
    """Semantic-CC on normalised inputs; ``forward(before, after, tokens)`` -> (cd_logits, caption_logits).

    :meth:`load_backbone` (a LOCAL SAM checkpoint) initialises the encoder of a network whose config names no
    ``sam_checkpoint``. The constructor reads no checkpoint; only a pretrained LLM (``llm_path``) is built from its
    folder, since transformers builds it there.
    """

    can_caption = True

    def __init__(self, cfg: SemanticCCConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or SemanticCCConfig()
        self.cfg = cfg
        c = cfg.embed_dim
        self.encoder = SamViT(cfg.img_size, cfg.patch, cfg.in_channels, c, cfg.depth, cfg.vit_heads, 4.0,
                              cfg.neck_channels, cfg.window, tuple(cfg.global_attn_indexes), cfg.lora_r,
                              cfg.lora_alpha, cfg.lora_dropout)
        self.bcsf = nn.ModuleList([BCSF(c, cfg.bcsf_grid, cfg.bcsf_ffn_ratio) for _ in cfg.global_attn_indexes])
        self.neck = nn.ModuleList([AggregationUnit(c, cfg.neck_channels, cfg.neck_mlp_ratio, cfg.neck_dim_head)
                                   for _ in range(cfg.neck_units)])
        self.cd_decoder = MultiScaleChangeDecoder(cfg.neck_channels, cfg.fpn_channels, cfg.cd_channels,
                                                  cfg.num_classes)
        self._build_caption_branch(cfg)
        if cfg.freeze_pretrained:
            self.encoder.freeze_pretrained()
            self.qformer.requires_grad_(False)
            self.query_tokens.requires_grad_(False)
            if cfg.qformer_checkpoint:  # MiniGPT-4 keeps ln_vision frozen with the Q-Former
                self.ln_vision.requires_grad_(False)
            if cfg.llm_lora_r <= 0:
                self.llm.requires_grad_(False)
        self.tokenizer: WordTokenizer | HFTokenizer | None = None
        if cfg.llm_path:
            self.tokenizer = HFTokenizer(cfg.llm_path)
        self.register_state_dict_post_hook(_drop_external)
        self.register_load_state_dict_post_hook(_allow_external_missing)

    def _build_caption_branch(self, cfg: SemanticCCConfig) -> None:
        try:
            from transformers import Blip2QFormerConfig, Blip2QFormerModel
        except ImportError as e:  # pragma: no cover - transformers is a dev/extra dependency
            raise ImportError("Semantic-CC needs the 'transformers' package (pip install transformers peft)") from e
        width = cfg.qformer_encoder_width or cfg.embed_dim
        self.vision_proj = nn.Linear(cfg.embed_dim, width) if width != cfg.embed_dim else None
        self.ln_vision = nn.LayerNorm(width)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer_hidden))
        nn.init.normal_(self.query_tokens, std=0.02)
        self.qformer = Blip2QFormerModel(Blip2QFormerConfig(
            hidden_size=cfg.qformer_hidden, num_hidden_layers=cfg.qformer_layers,
            num_attention_heads=cfg.qformer_heads, intermediate_size=cfg.qformer_intermediate,
            encoder_hidden_size=width, cross_attention_frequency=cfg.qformer_cross_every))
        self.enhancer = ChangeFeatureEnhancer(cfg.qformer_hidden, cfg.llm_hidden)
        self.llm = self._build_llm(cfg)

    def _build_llm(self, cfg: SemanticCCConfig) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        if cfg.llm_path:
            if _on_meta():
                llm = AutoModelForCausalLM.from_config(
                    AutoConfig.from_pretrained(cfg.llm_path, local_files_only=True))  # nosec B615
            else:
                # A folder with only pytorch_model*.bin goes through our guarded loader (weights_only, a clear
                # refusal of pickles) rather than transformers' own torch.load.
                weights = {} if any(Path(cfg.llm_path).glob("*.safetensors")) else \
                    {"state_dict": read_checkpoint(cfg.llm_path)}
                # local_files_only: nothing is downloaded, so revision pinning (bandit B615) does not apply
                llm = AutoModelForCausalLM.from_pretrained(cfg.llm_path, local_files_only=True,  # nosec B615
                                                           dtype=getattr(torch, cfg.llm_dtype), **weights)
            if llm.config.hidden_size != cfg.llm_hidden:
                raise ValueError(f"{cfg.llm_path}: hidden size {llm.config.hidden_size} != llm_hidden {cfg.llm_hidden}")
        else:
            llm = LlamaForCausalLM(LlamaConfig(
                vocab_size=cfg.vocab_size, hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_intermediate,
                num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
                num_key_value_heads=cfg.llm_heads, max_position_embeddings=cfg.llm_max_positions,
                tie_word_embeddings=False))
        if cfg.llm_lora_r > 0:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as e:  # pragma: no cover
                raise ImportError("Semantic-CC's LLM LoRA needs the 'peft' package (or set llm_lora_r=0)") from e
            with warnings.catch_warnings():  # peft probes a transformers attribute deprecated in v5
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                llm = get_peft_model(llm, LoraConfig(r=cfg.llm_lora_r, lora_alpha=cfg.llm_lora_alpha,
                                                     lora_dropout=cfg.llm_lora_dropout, bias="none",
                                                     target_modules=list(cfg.llm_lora_targets)))
        return llm

    # ---- pretrained and external (re-loaded, never saved) weights -----------------------------------------
    @property
    def default_beam_size(self) -> int:
        return self.cfg.beam_size

    @property
    def has_text_tokenizer(self) -> bool:
        return self.tokenizer is not None

    def load_external_weights(self) -> None:
        """SAM's encoder from ``sam_checkpoint`` and, with ``freeze_pretrained``, the Q-Former from
        ``qformer_checkpoint``: the tensors :meth:`is_external` keeps out of model files. (The LLM of ``llm_path``
        is read when the LLM is built: transformers builds a pretrained LLM from its folder.)"""
        if self.cfg.sam_checkpoint:
            load_sam_encoder(self.encoder, self.cfg.sam_checkpoint)
        if self.cfg.qformer_checkpoint and self.cfg.freeze_pretrained:
            load_qformer(self, self.cfg.qformer_checkpoint)

    def load_backbone(self, path: str | Path) -> None:
        """SAM's encoder from a LOCAL SAM checkpoint, to start training from (its tensors then go into the model
        file). A config that names ``sam_checkpoint`` keeps that one: :meth:`load_external_weights` reads it, so
        ``path`` is not read."""
        if not self.cfg.sam_checkpoint:
            load_sam_encoder(self.encoder, path)

    def load_pretrained(self) -> None:
        """The external tensors, plus the parts a recipe starts from and then trains: an unfrozen Q-Former from
        ``qformer_checkpoint``."""
        super().load_pretrained()
        if self.cfg.qformer_checkpoint and not self.cfg.freeze_pretrained:
            load_qformer(self, self.cfg.qformer_checkpoint)

    def is_external(self, key: str) -> bool:
        """True for a state-dict key whose tensor comes from ``llm_path`` (read when the LLM is built) or from
        ``sam_checkpoint`` / a frozen ``qformer_checkpoint`` (read by :meth:`load_external_weights`)."""
        if self.cfg.llm_path and key.startswith("llm.") and "lora_" not in key:
            return True
        if self.cfg.qformer_checkpoint and self.cfg.freeze_pretrained and (
                key.startswith(("qformer.", "ln_vision.")) or key == "query_tokens"):
            return True
        return bool(self.cfg.sam_checkpoint) and key.startswith("encoder.") and ".lora_" not in key \
            and not key.startswith("encoder.neck.")

    # ---- tokenizer ------------------------------------------------------------------------------------------
    def attach_vocabulary(self, vocabulary: Any) -> None:
        """Use a word-level Vocabulary as the LLM's tokenizer unless the LLM brought its own."""
        if not isinstance(self.tokenizer, HFTokenizer):
            self.tokenizer = WordTokenizer(vocabulary)

    def _tok(self) -> WordTokenizer | HFTokenizer:
        if self.tokenizer is None:
            raise RuntimeError("Semantic-CC has no tokenizer: set llm_path or attach a Vocabulary")
        return self.tokenizer

    def decode_captions(self, ids: torch.Tensor) -> list[str]:
        return self._tok().decode_batch(ids)

    # ---- encoder / neck / CD ----------------------------------------------------------------------------------
    def encode(self, before: torch.Tensor, after: torch.Tensor) -> SemanticCCFeatures:
        x = self.encoder.embed(torch.cat([before, after], 0))  # both dates, shared weights
        bcsf = dict(zip(self.cfg.global_attn_indexes, self.bcsf))
        for i, blk in enumerate(self.encoder.blocks):
            x = blk(x)
            if i in bcsf:
                x = bcsf[i](x)
        h, w = x.shape[1:3]
        f_cd = self.encoder.neck(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        f_cc = x.reshape(x.shape[0], h * w, -1)
        for unit in self.neck:
            f_cc, f_cd = unit(f_cc, f_cd)
        return SemanticCCFeatures(f_cc, f_cd, (h, w), (before.shape[-2], before.shape[-1]))

    def change_logits(self, feats: SemanticCCFeatures) -> torch.Tensor:
        b = feats.cd.shape[0] // 2
        h, w = feats.grid
        maps = feats.cd.transpose(1, 2).reshape(2 * b, -1, h, w)
        return self.cd_decoder(maps[:b], maps[b:], feats.size)

    # ---- caption branch ---------------------------------------------------------------------------------------
    def change_tokens(self, feats: SemanticCCFeatures) -> torch.Tensor:
        """Q-Former on each date (shared) + enhancer -> (B, num_query_tokens, llm_hidden)."""
        img = self.ln_vision(feats.cc if self.vision_proj is None else self.vision_proj(feats.cc))
        q = self.query_tokens.expand(img.shape[0], -1, -1)
        out = self.qformer(query_embeds=q, encoder_hidden_states=img,
                           encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long, device=img.device))
        z = out.last_hidden_state
        b = z.shape[0] // 2
        return self.enhancer(z[:b], z[b:])

    def _embed_ids(self, ids: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        return self.llm.get_input_embeddings()(ids)

    def prompt_embeds(self, change: torch.Tensor, instruction: int = 0) -> torch.Tensor:
        """The prompter: ``<bos> ###Human: <Img>`` + change tokens + ``</Img> instruction ###Assistant:``."""
        tok = self._tok()
        instructions = self.cfg.instructions
        text = self.cfg.prompt_template.format(instruction=instructions[instruction % len(instructions)])
        before_img, after_img = text.split("<ImageHere>")
        dev, b = change.device, change.shape[0]
        pre = self._embed_ids([tok.bos_id, *tok.encode(before_img)], dev)
        post = self._embed_ids(tok.encode(after_img), dev)
        dtype = pre.dtype
        return torch.cat([pre.expand(b, -1, -1), change.to(dtype), post.expand(b, -1, -1)], 1)

    def caption_logits(self, feats: SemanticCCFeatures, tokens: torch.Tensor, instruction: int = 0) -> torch.Tensor:
        """Teacher forcing: ``tokens`` (n*B, T) = <bos> w1 .. (pair-major) -> logits (n*B, T, V) predicting the
        next token at every caption position (targets = the caption shifted left), as CaptionDecoder."""
        prefix = self.prompt_embeds(self.change_tokens(feats), instruction)
        if tokens.shape[0] != prefix.shape[0]:
            if tokens.shape[0] % prefix.shape[0]:
                raise ValueError(f"{tokens.shape[0]} captions for {prefix.shape[0]} image pairs")
            prefix = prefix.repeat_interleave(tokens.shape[0] // prefix.shape[0], dim=0)
        x = torch.cat([prefix, self._embed_ids(tokens, prefix.device)], 1)
        logits = self.llm(inputs_embeds=x).logits
        return logits[:, prefix.shape[1]:]

    @torch.no_grad()
    def generate_captions(self, feats: SemanticCCFeatures, beam_size: int = 1, max_len: int | None = None,
                          instruction: int = 0) -> torch.Tensor:
        """Generated token ids (B, T) after <bos> through the LLM's ``generate`` (greedy or beam search);
        finished rows are padded with the tokenizer's pad id."""
        tok = self._tok()
        prefix = self.prompt_embeds(self.change_tokens(feats), instruction)
        b, dev = prefix.shape[0], prefix.device
        x = torch.cat([prefix, self._embed_ids([tok.bos_id], dev).expand(b, -1, -1)], 1)
        steps = (max_len or self.cfg.max_caption_length) - 1
        model = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        out = model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=dev),
                             max_new_tokens=steps, num_beams=beam_size, do_sample=False, length_penalty=0.0,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                             suppress_tokens=[tok.pad_id, tok.bos_id], early_stopping=True)
        return out  # with only inputs_embeds given, generate returns just the new tokens

    def forward(self, before: torch.Tensor, after: torch.Tensor, tokens: torch.Tensor | None = None,
                instruction: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.encode(before, after)
        cap = self.caption_logits(feats, tokens, instruction) if tokens is not None else None
        return self.change_logits(feats), cap


def _drop_external(module: SemanticCC, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and module.is_external(k[len(prefix):])]:
        del state_dict[key]


def _allow_external_missing(module: SemanticCC, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not module.is_external(k)]
