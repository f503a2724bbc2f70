"""Typed configuration schema of an sdetr run.

Every setting a run can take lives here as a dataclass field with a type and a default. The
loader (:mod:`sdetr.config.loader`) checks YAML files and ``--set`` overrides against these
types, and calls :meth:`ExperimentConfig.validate` so that impossible combinations fail when
the config is loaded, naming the offending key.

Nothing here imports from the rest of sdetr: models and engine read these objects only in
their builders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from sdetr.config.errors import ConfigError

BackboneName = Literal["resnet50", "resnet34", "resnet18", "resnet10", "swin_t"]
QuerySource = Literal["learned", "two_stage", "topk"]
EncoderKind = Literal["dense", "sparse", "interleaved", "sparse_interleaved"]
TokenSelection = Literal["dam", "objectness", "random"]
AttentionKind = Literal["deformable", "key_aware"]
LiteVariant = Literal["paper", "code"]
ClsLoss = Literal["focal", "varifocal"]
KernelBackend = Literal["auto", "reference", "compiled"]
Precision = Literal["fp32", "bf16", "bf16-mixed", "auto"]
LrSchedule = Literal["step", "cosine"]
ProfileMeasurement = Literal["params", "flops", "fps", "memory"]
ProfileModules = Literal["full", "inference_only"]


@dataclass
class BackboneConfig:
    """Feature extractor.

    ``frozen_bn`` and ``train_all`` default to the paper setup (pretrained weights, frozen
    BatchNorm, frozen stem/first stage). From-scratch CPU presets set ``frozen_bn: false`` and
    ``train_all: true`` (a from-scratch backbone needs trainable BatchNorm).
    """

    name: BackboneName = "resnet50"
    weights: Optional[str] = None
    frozen_bn: bool = True
    train_all: bool = False
    drop_path_rate: float = 0.2
    # ResNets: every residual block's last BatchNorm starts at weight 0 (the block starts as
    # the identity; Goyal et al. 2017), for from-scratch training with trainable BatchNorm
    zero_init_residual: bool = False
    # ResNets: maps in channels_last (NHWC) memory, and in training the weights too once the
    # DeepSpeed engine is set up: oneDNN's convolutions skip their layout conversions
    # (measured ~9% of a bf16-mixed _tiny training step on the CPU). The weights stay NCHW
    # (a warning says so) under ZeRO 1/2 or precision bf16, whose flat buffers alias them.
    channels_last: bool = False
    # ResNets: planes of the first stage (64 in the papers); every stage scales with it
    # (C3/C4/C5 = width x 2/4/8, x4 for resnet50), their convolutions' FLOPs with its square;
    # the 7x7 stem keeps 64 channels. Pretrained weights exist for 64 only.
    width: int = 64


@dataclass
class LossConfig:
    """Loss weights and matcher costs (REFERENCE §1.1, §7)."""

    cls_coef: float = 2.0
    bbox_coef: float = 5.0
    giou_coef: float = 2.0
    focal_alpha: float = 0.25
    aux_loss: bool = True
    dam_coef: float = 1.0
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    one2many_coef: float = 1.0  # weight of the one-to-many set's losses (model.one2many_queries)
    dn_coef: float = 1.0  # weight of the denoising queries' losses (model.dn_groups)
    dense_coef: float = 1.0  # weight of the dense token head's losses (model.dense_aux)
    # focal: one-hot targets (the papers); varifocal: a matched query's target is its box's IoU
    cls_loss: ClsLoss = "focal"


@dataclass
class ModelConfig:
    """One detector of the Deformable-DETR family.

    The three seams of the detector are chosen by ``encoder`` (dense | sparse | interleaved),
    ``queries`` (learned | two_stage | topk) and ``box_refine`` (decoder).

    * Deformable DETR: ``encoder=dense, queries=learned``; ``+ box_refine``; two-stage is
      ``queries=two_stage, box_refine=true``.
    * Efficient DETR (the paper's "Top-k & BBR" row): ``queries=topk, box_refine=true``.
    * Sparse DETR: Efficient DETR + ``encoder=sparse`` with ``rho`` and ``enc_aux_loss``.
    * Lite-DETR (REFERENCE §9): Efficient DETR + ``encoder=interleaved`` +
      ``attention=key_aware``; the name H{h}L{L-h}-(A+1)×B is ``lite_high_levels=h``,
      ``lite_high_updates=A``, ``lite_blocks=B``.
    * Sparse + Lite: ``encoder=sparse_interleaved``: the interleaved encoder whose low-level
      updates refine only the low-level tokens a Sparse DETR scorer selects (``rho`` over the
      valid low-level tokens, ``token_selection``).

    ``attention`` picks the deformable attention of the encoder AND the decoder cross-attention:
    ``deformable`` (MSDA) or ``key_aware`` (KDA, weights from query–key similarity).

    The interleaved encoders derive their layer count from ``lite_*`` (see
    :attr:`num_encoder_layers`); ``enc_layers`` is read by the dense and sparse encoders only.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    hidden_dim: int = 256
    nheads: int = 8
    num_feature_levels: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_layers: int = 6
    dec_layers: int = 6
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    num_classes: int = 91
    encoder: EncoderKind = "dense"
    queries: QuerySource = "learned"
    box_refine: bool = False
    rho: float = 0.1
    enc_aux_loss: bool = False
    token_selection: TokenSelection = "dam"
    attention: AttentionKind = "deformable"
    # Lite-DETR interleaved encoder (encoder=interleaved|sparse_interleaved only):
    lite_high_levels: int = 3  # h: the h smallest maps are high-level tokens (H3L1: 3, H2L2: 2)
    lite_high_updates: int = 6  # A: high-level updates per block
    lite_blocks: int = 1  # B: blocks (each: A high-level updates, then one low-level update)
    lite_variant: LiteVariant = "paper"  # paper: (A+1)·B layers; code: release's fused A·B layers
    kda_proj_key: bool = False  # KDA: own key projection (False: keys = projected values)
    kernel_backend: KernelBackend = "auto"
    # Hybrid matching (H-DETR), training only: T extra queries matched one-to-many against the
    # targets repeated K times; eval and inference see the num_queries one-to-one queries only.
    one2many_queries: int = 0  # T (0 = off)
    one2many_repeats: int = 6  # K
    # Denoising queries (DN-DETR / DINO's DN part), training only, two_stage / topk queries:
    # dn_groups noised copies of the ground truth reconstruct their boxes and labels.
    dn_groups: int = 0  # G (0 = off)
    dn_label_noise: float = 0.2  # probability of a label flip
    dn_box_noise: float = 0.4  # λ: centre shift up to λ·w/2, w and h scaled within 1 ± λ
    dn_negatives: bool = False  # DINO's contrastive denoising: a near-miss copy (noise λ..2λ)
    # of every target per group, trained as "no object"
    # Dense one-to-many supervision of the encoder tokens, training only: a class and a box
    # per token, every token near an object's centre a positive (sdetr.models.dense_aux).
    dense_aux: bool = False
    # Top-k query selection (queries two_stage | topk) passes over a token whose proposal box
    # overlaps a better-scoring one's by more than this IoU (Fast NMS, sdetr.models.query_nms;
    # None = the papers' plain top-k).
    query_nms: Optional[float] = None
    # DINO's "look forward twice" (box_refine only): layer l's predicted box refines layer
    # l-1's box before its detach, so its box losses also train layer l-1; the next layer's
    # reference stays detached. Same values, other gradients; eval unchanged.
    look_forward_twice: bool = False
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self, prefix: str = "model") -> None:
        """Raise :class:`ConfigError` naming the key of the first impossible setting."""
        _positive(self, prefix, ("hidden_dim", "nheads", "num_feature_levels", "dim_feedforward",
                                 "dec_layers", "enc_n_points", "dec_n_points", "num_queries",
                                 "num_classes"))
        if self.enc_layers < 0:
            raise ConfigError(f"{prefix}.enc_layers: must be >= 0, got {self.enc_layers}")
        if self.hidden_dim % self.nheads:
            raise ConfigError(f"{prefix}.hidden_dim: {self.hidden_dim} is not divisible by "
                              f"{prefix}.nheads={self.nheads}")
        if self.hidden_dim % 32:
            raise ConfigError(f"{prefix}.hidden_dim: GroupNorm(32) needs a multiple of 32, "
                              f"got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.rho <= 1.0:
            raise ConfigError(f"{prefix}.rho: must be in (0, 1], got {self.rho}")
        if self.queries != "learned" and not self.box_refine:
            raise ConfigError(f"{prefix}.box_refine: queries={self.queries!r} needs "
                              "box_refine=true (two-stage proposals are refined)")
        if self.look_forward_twice and not self.box_refine:
            raise ConfigError(f"{prefix}.look_forward_twice: needs box_refine=true (without "
                              "refinement no layer's box feeds the next)")
        if self.selects_tokens and self.queries == "learned":
            raise ConfigError(f"{prefix}.encoder: {self.encoder!r} needs queries 'two_stage' or "
                              "'topk' (its scoring network shares the proposal projection)")
        if not self.selects_tokens and self.token_selection != "dam":
            raise ConfigError(f"{prefix}.token_selection: only meaningful with "
                              "encoder=sparse|sparse_interleaved")
        if self.enc_aux_loss and self.encoder != "sparse":
            raise ConfigError(f"{prefix}.enc_aux_loss: only the sparse encoder has auxiliary "
                              f"heads, got {prefix}.encoder={self.encoder!r}")
        if self.enc_aux_loss and self.enc_layers < 2:
            raise ConfigError(f"{prefix}.enc_aux_loss: needs enc_layers >= 2")
        if self.encoder == "sparse" and self.enc_layers == 0:
            raise ConfigError(f"{prefix}.enc_layers: encoder={self.encoder!r} needs >= 1 layer")
        if self.queries != "learned" and self.num_feature_levels < 1:
            raise ConfigError(f"{prefix}.num_feature_levels: must be >= 1")
        self._validate_lite(prefix)
        self._validate_one2many(prefix)
        self._validate_denoising(prefix)
        self._validate_query_nms(prefix)
        if self.backbone.name != "swin_t" and self.backbone.drop_path_rate != 0.2:
            raise ConfigError(f"{prefix}.backbone.drop_path_rate: only used by swin_t")
        if self.backbone.name == "swin_t" and self.backbone.channels_last:
            raise ConfigError(f"{prefix}.backbone.channels_last: only for ResNets")
        if self.backbone.name == "swin_t" and self.backbone.zero_init_residual:
            raise ConfigError(f"{prefix}.backbone.zero_init_residual: only for ResNets "
                              "(swin_t has no residual BatchNorm)")
        self._validate_backbone_width(prefix)
        if self.backbone.zero_init_residual and self.backbone.weights is not None:
            raise ConfigError(f"{prefix}.backbone.zero_init_residual: an init for from-scratch "
                              f"training; {prefix}.backbone.weights would overwrite it")

    def _validate_backbone_width(self, prefix: str) -> None:
        """``backbone.width``: ResNets only, a positive multiple of 8, 64 with weights."""
        width = self.backbone.width
        if width == 64:
            return
        if self.backbone.name == "swin_t":
            raise ConfigError(f"{prefix}.backbone.width: only for ResNets (swin_t has 96)")
        if width < 8 or width % 8:
            raise ConfigError(f"{prefix}.backbone.width: must be a positive multiple of 8, "
                              f"got {width}")
        if self.backbone.weights is not None:
            raise ConfigError(f"{prefix}.backbone.width: pretrained weights are for width 64, "
                              f"got {width} with {prefix}.backbone.weights")

    def _validate_query_nms(self, prefix: str) -> None:
        """``query_nms``: an IoU in (0, 1), for top-k query selection only."""
        if self.query_nms is None:
            return
        if self.queries == "learned":
            raise ConfigError(f"{prefix}.query_nms: needs queries 'two_stage' or 'topk' "
                              "(learned queries have no proposals to suppress)")
        if not 0.0 < self.query_nms < 1.0:
            raise ConfigError(f"{prefix}.query_nms: an IoU threshold in (0, 1), got "
                              f"{self.query_nms}")

    def _validate_one2many(self, prefix: str) -> None:
        """Rules of hybrid matching's one-to-many branch."""
        if self.one2many_queries < 0:
            raise ConfigError(f"{prefix}.one2many_queries: must be >= 0, got "
                              f"{self.one2many_queries}")
        if self.one2many_repeats < 1:
            raise ConfigError(f"{prefix}.one2many_repeats: must be >= 1, got "
                              f"{self.one2many_repeats}")
        if self.loss.one2many_coef <= 0:
            raise ConfigError(f"{prefix}.loss.one2many_coef: must be > 0, got "
                              f"{self.loss.one2many_coef}")

    def _validate_denoising(self, prefix: str) -> None:
        """Rules of the denoising queries."""
        if self.dn_groups < 0:
            raise ConfigError(f"{prefix}.dn_groups: must be >= 0, got {self.dn_groups}")
        if self.dn_groups and self.queries == "learned":
            raise ConfigError(f"{prefix}.dn_groups: denoising queries need box references, "
                              "i.e. queries 'two_stage' or 'topk' (got 'learned')")
        if not 0.0 <= self.dn_label_noise <= 1.0:
            raise ConfigError(f"{prefix}.dn_label_noise: must be in [0, 1], got "
                              f"{self.dn_label_noise}")
        if self.dn_box_noise < 0:
            raise ConfigError(f"{prefix}.dn_box_noise: must be >= 0, got {self.dn_box_noise}")
        if self.loss.dn_coef <= 0:
            raise ConfigError(f"{prefix}.loss.dn_coef: must be > 0, got {self.loss.dn_coef}")
        if self.dn_negatives and not self.dn_groups:
            raise ConfigError(f"{prefix}.dn_negatives: needs denoising queries "
                              f"({prefix}.dn_groups > 0)")
        if self.loss.dense_coef <= 0:
            raise ConfigError(f"{prefix}.loss.dense_coef: must be > 0, got "
                              f"{self.loss.dense_coef}")

    def _validate_lite(self, prefix: str) -> None:
        """Rules of the interleaved encoders and of key-aware attention."""
        if self.kda_proj_key and self.attention != "key_aware":
            raise ConfigError(f"{prefix}.kda_proj_key: only used with attention=key_aware, got "
                              f"{prefix}.attention={self.attention!r}")
        if not self.interleaved:
            for key in LITE_KEYS:
                if getattr(self, key) != getattr(ModelConfig, key):
                    raise ConfigError(f"{prefix}.{key}: only used by encoder=interleaved|"
                                      f"sparse_interleaved, got {prefix}.encoder={self.encoder!r}")
            return
        levels = self.num_feature_levels
        if not 1 <= self.lite_high_levels <= levels - 1:
            raise ConfigError(f"{prefix}.lite_high_levels: must be in [1, num_feature_levels - 1 "
                              f"= {levels - 1}], got {self.lite_high_levels}")
        if self.lite_high_updates < 1:
            raise ConfigError(f"{prefix}.lite_high_updates: must be >= 1, got "
                              f"{self.lite_high_updates}")
        if self.lite_blocks < 1:
            raise ConfigError(f"{prefix}.lite_blocks: must be >= 1, got {self.lite_blocks}")

    @property
    def two_stage(self) -> bool:
        """True when decoder queries come from encoder tokens (two-stage or top-k)."""
        return self.queries != "learned"

    @property
    def interleaved(self) -> bool:
        """True for Lite-DETR's interleaved encoders (plain or with token selection)."""
        return self.encoder in ("interleaved", "sparse_interleaved")

    @property
    def selects_tokens(self) -> bool:
        """True when a Sparse DETR scorer selects encoder tokens (``rho``, ``token_selection``)."""
        return self.encoder in ("sparse", "sparse_interleaved")

    @property
    def num_encoder_layers(self) -> int:
        """Encoder layers actually built: ``enc_layers``, or for the interleaved encoders
        (A + 1)·B (paper) / A·B (code)."""
        if not self.interleaved:
            return self.enc_layers
        per_block = self.lite_high_updates + (1 if self.lite_variant == "paper" else 0)
        return per_block * self.lite_blocks


@dataclass
class DataConfig:
    """Where images come from and how they are resized.

    ``root`` is a COCO-2017-style folder (``train2017/``, ``val2017/``, ``annotations/``).
    ``synthetic`` makes the run generate (once) the deterministic synthetic dataset there.
    ``group_by_aspect`` gives the training images of one step (on all ranks) similar aspect
    ratios: less padding and less waiting for the slowest rank (see
    :class:`sdetr.engine.data.AspectBatchSampler`; the official code does not group, so the
    paper presets leave it off).
    """

    root: str = "data/coco"
    train_split: str = "train2017"
    val_split: str = "val2017"
    synthetic: bool = False
    synth_train: int = 2000
    synth_val: int = 200
    synth_seed: int = 0
    train_scales: list[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672,
                                                              704, 736, 768, 800])
    train_max_size: int = 1333
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    eval_size: int = 800
    eval_max_size: int = 1333
    num_workers: int = 2
    group_by_aspect: bool = False
    # Progressive resizing: the first early_epochs epochs resize to early_scale x train_scales
    # (rounded; same max size and crop branch); early_epochs 0 = off. Eval is unchanged.
    early_scale: float = 1.0
    early_epochs: int = 0

    def validate(self, prefix: str = "data") -> None:
        if not self.train_scales:
            raise ConfigError(f"{prefix}.train_scales: must not be empty")
        if any(s <= 0 for s in self.train_scales):
            raise ConfigError(f"{prefix}.train_scales: sizes must be positive")
        if self.early_epochs < 0:
            raise ConfigError(f"{prefix}.early_epochs: must be >= 0, got {self.early_epochs}")
        if not 0.0 < self.early_scale <= 1.0:
            raise ConfigError(f"{prefix}.early_scale: a factor in (0, 1], got {self.early_scale}")
        if self.crop_min > self.crop_max:
            raise ConfigError(f"{prefix}.crop_min: {self.crop_min} > crop_max {self.crop_max}")
        _positive(self, prefix, ("train_max_size", "eval_size", "eval_max_size"))
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers: must be >= 0")

    @property
    def early_scales(self) -> list[int]:
        """The shorter sides of the first ``early_epochs`` epochs: ``early_scale`` times
        each of ``train_scales``, rounded."""
        return [max(1, round(s * self.early_scale)) for s in self.train_scales]

    def scales_of_epoch(self, epoch: int) -> list[int]:
        """The shorter sides epoch ``epoch`` (1-based) trains at: :attr:`early_scales` in the
        first ``early_epochs`` epochs, else ``train_scales``."""
        return list(self.early_scales if epoch <= self.early_epochs else self.train_scales)


@dataclass
class TrainConfig:
    """Optimisation (REFERENCE §1.1).

    ``batch_size`` is the TOTAL batch of one optimizer step over all workers;
    ``micro_batch_size`` the images one worker processes per forward. Gradient accumulation
    makes up the rest: ``batch_size = micro_batch_size × workers × accumulation``, so changing
    the worker count never changes the optimisation.

    ``precision``: ``fp32``; ``bf16`` = DeepSpeed's bf16 mode (bf16 weights, activations and
    BatchNorm buffers, fp32 master weights in the optimizer); ``bf16-mixed`` = fp32 weights and
    optimizer, the forward under ``torch.autocast`` to bfloat16 and the loss in fp32 (on a CPU
    with AMX-BF16 the fastest of the three for the tiny presets; see README); ``auto`` =
    ``bf16-mixed`` where bf16 math is native (a CPU with AMX-BF16 or AVX512-BF16, a GPU that
    supports bf16), else ``fp32`` — resolved by the launcher on the machine that starts the
    run, which writes the concrete value into the run's config (emulated bf16 is 10-70x slower
    than fp32 on CPUs without it).

    ``cpus``: the Ray CPUs of the whole run, split evenly over its workers (each worker's
    share is its torch thread count): 2 on a 2-core machine gives one worker 2 threads or two
    workers 1 each. None: Ray Train's default, 1 CPU per worker. A sweep's ``resources``
    (``cpus_per_worker``) win over it.
    ``fused_optimizer``: AdamW's fused kernel (``torch.optim.AdamW(fused=True)``: one pass over
    the parameters instead of one per tensor and operation; 13 against 67 ms per step for the
    13M parameters of a ``_tiny`` model on one CPU core), the same update up to rounding.

    ``malloc_retain``: the training process's glibc malloc keeps freed memory mapped (no
    trimming, no fresh ``mmap`` below 32 MiB) instead of returning it to the kernel, so the
    buffers a step frees and re-allocates are not page-faulted in again every step (7-12
    thousand minor faults and 32-51 ms of kernel time per ``_tiny`` step on 2 cores by
    default, ~400 and 16-31 ms retained); see
    :mod:`sdetr.engine.host_memory`. Recorded as the tag ``sdetr.malloc_retain``
    (off / applied / partial / unavailable: not glibc).

    ``lr_schedule``: ``step`` = the papers' ``StepLR``: every lr × 0.1 after each ``lr_drop``
    epochs; ``cosine`` = every lr × ``(1 + cos(pi * t / T)) / 2`` after t of the run's T
    optimizer steps (``epochs`` × steps per epoch; ``lr_drop`` unused), down to 0 at the end.

    ``eval_every``: evaluate after every this many epochs (and after the last one);
    ``eval_every_steps``: ALSO evaluate every this many optimizer steps inside an epoch (not
    at an epoch's end, which ``eval_every`` owns), logged as ``eval_steps/<AP key>`` at MLflow
    step = optimizer steps done, with ``eval_steps/train_min`` = training minutes so far (the
    evaluations' own time excluded): a learning curve finer than one point per epoch.

    ``ema_decay``: keep an exponential moving average of the weights with this decay (with a
    warm-up, see :mod:`sdetr.engine.ema`) and evaluate, profile and save it instead of the raw
    weights, which the optimizer keeps training; None = off.

    ``deepspeed_config``: optional path to a DeepSpeed JSON file whose settings are merged over
    the config the engine generates (e.g. ``zero_optimization.overlap_comm``, bucket sizes,
    ``communication_data_type``); a relative path is resolved against the current working
    directory. The engine keeps what it owns: the batch keys must be ``"auto"`` or agree with
    ``batch_size``/``micro_batch_size``/``workers``, ``zero_optimization.stage`` with
    ``zero_stage``, ``bf16.enabled`` with ``precision``; fp16 and ``optimizer``/``scheduler``
    sections are refused (see :func:`sdetr.engine.deepspeed_engine.load_deepspeed_json`).
    """

    epochs: int = 50
    batch_size: int = 16
    micro_batch_size: int = 2
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1
    sqrt_lr_scaling: bool = True
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: int = 40
    lr_schedule: LrSchedule = "step"
    seed: int = 42
    workers: int = 8
    cpus: Optional[float] = None
    use_gpu: bool = True
    zero_stage: int = 0
    precision: Precision = "fp32"
    fused_optimizer: bool = False
    malloc_retain: bool = False
    output_dir: str = "runs"
    keep_checkpoints: int = 2
    eval_every: int = 1
    eval_every_steps: Optional[int] = None
    ema_decay: Optional[float] = None
    deepspeed_config: Optional[str] = None

    def validate(self, prefix: str = "train") -> None:
        _positive(self, prefix, ("epochs", "batch_size", "micro_batch_size", "workers",
                                 "keep_checkpoints", "eval_every"))
        for key in ("lr", "lr_backbone", "lr_linear_proj_mult"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}: must be >= 0")
        if self.deepspeed_config is not None and not self.deepspeed_config.strip():
            raise ConfigError(f"{prefix}.deepspeed_config: empty path (leave it unset for the "
                              "generated DeepSpeed config)")
        if self.cpus is not None and self.cpus <= 0:
            raise ConfigError(f"{prefix}.cpus: must be > 0, got {self.cpus}")
        if self.eval_every_steps is not None and self.eval_every_steps < 1:
            raise ConfigError(f"{prefix}.eval_every_steps: must be >= 1, got "
                              f"{self.eval_every_steps}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"{prefix}.zero_stage: must be 0, 1 or 2, got {self.zero_stage}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"{prefix}.ema_decay: must be in (0, 1), got {self.ema_decay}")
        per_step = self.micro_batch_size * self.workers
        if self.batch_size % per_step:
            raise ConfigError(f"{prefix}.batch_size: total batch {self.batch_size} is not a "
                              f"multiple of micro_batch_size × workers = {per_step}")

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches each worker accumulates per optimizer step."""
        return self.batch_size // (self.micro_batch_size * self.workers)


@dataclass
class EvalConfig:
    """Evaluation settings; ``rho_sweep`` re-evaluates a sparse model at other keeping ratios.

    ``fold_bn``: evaluate a copy of the model whose BatchNorms are folded into the convolutions
    before them (:func:`sdetr.models.fold_batch_norm`: the same outputs up to float rounding,
    within 1e-4, one elementwise pass less per backbone feature map); recorded as the tag
    ``sdetr.eval.fold_bn``. Training, checkpoints and the saved model never see folded weights.
    """

    batch_size: int = 2
    num_select: int = 100
    rho_sweep: list[float] = field(default_factory=list)
    fold_bn: bool = True

    def validate(self, prefix: str = "eval") -> None:
        _positive(self, prefix, ("batch_size", "num_select"))
        for rho in self.rho_sweep:
            if not 0.0 < rho <= 1.0:
                raise ConfigError(f"{prefix}.rho_sweep: {rho} is outside (0, 1]")


@dataclass
class ProfileConfig:
    """The profiling stage that ends a training run (``sdetr.profiling``, REFERENCE §10).

    After the final evaluation, rank 0 measures ``what`` on the trained model (empty list: no
    stage) with the paper protocols, logs the figures to the run's MLflow run and writes
    ``profile.json``. ``image_size`` [H, W] replaces every protocol's input size (empty: 850×1040
    for FLOPs, the first val image after the eval resize for FPS/memory); ``batch_sizes`` are
    the FPS/memory batches ("FPS" = 1, "B4FPS" = 4); ``iters`` / ``warmup`` (None: 300 / 5 on
    CUDA, 10 / 2 on CPU); ``modules``: count what the released code runs ("full") or only
    inference modules; ``match_published``: Sparse DETR rows also count the published protocol.
    """

    what: list[ProfileMeasurement] = field(default_factory=lambda: ["params", "flops"])
    image_size: list[int] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    iters: Optional[int] = None
    warmup: Optional[int] = None
    modules: ProfileModules = "full"
    match_published: bool = True

    def validate(self, prefix: str = "profile") -> None:
        if len(set(self.what)) != len(self.what):
            raise ConfigError(f"{prefix}.what: {self.what} names a measurement twice")
        if self.image_size and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ConfigError(f"{prefix}.image_size: expected [H, W] of positive ints or [], "
                              f"got {self.image_size}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"{prefix}.batch_sizes: expected positive ints, "
                              f"got {self.batch_sizes}")
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"{prefix}.iters: must be >= 1, got {self.iters}")
        if self.warmup is not None and self.warmup < 0:
            raise ConfigError(f"{prefix}.warmup: must be >= 0, got {self.warmup}")


@dataclass
class ExperimentConfig:
    """A whole run: what to build, what to train on, how, and how to evaluate."""

    name: str = "run"
    preset: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def validate(self) -> None:
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.eval.validate("eval")
        self.profile.validate("profile")
        if self.eval.rho_sweep and not self.model.selects_tokens:
            raise ConfigError("eval.rho_sweep: only a token-selecting encoder "
                              "(model.encoder=sparse|sparse_interleaved) has a keeping ratio")


LITE_KEYS = ("lite_high_levels", "lite_high_updates", "lite_blocks", "lite_variant")
"""ModelConfig keys read only by the interleaved encoders."""


def _positive(obj: object, prefix: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value <= 0:
            raise ConfigError(f"{prefix}.{key}: must be > 0, got {value}")
