"""The recipe's settings: frozen-shape dataclasses (an OmegaConf structured config on the command line).

`RecipeConfig()` is the CPU-sized SmolLM2 default; experiments/configs/*.yaml restate or override it. Every
recipe function reads its settings by attribute, so a `RecipeConfig`, a `dataclasses.replace` of one or an
OmegaConf DictConfig built from it all work. `check_config` raises one `UsageError` listing every bad value.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from typing import Dict, List, Optional

STAGE_KINDS = ("stage0", "stage1", "sft", "dpo")
# stage1.layer_order values that rank the layers after the align-all stage, and the score each ranks by
ALIGNED_ORDERS = {"aligned": "nmse", "aligned_kl": "kl"}
# what resume_with_changes=true lets differ from an out's config.yaml: these keys of every stage, and `steps`
# of a stage kind none of whose stages has finished; data, model, loss and batch settings stay refused
CHANGEABLE_ON_RESUME = ("lr", "betas", "eps", "weight_decay", "clip_norm", "warmup_steps", "warmup_ratio",
                        "loss_chunk")
INITS = ("mil", "conv", "norm", "calibrated", "random")     # l2m_jax.convert.hybridize.INITS


class UsageError(ValueError):
    """A command line or configuration that cannot run."""


@dataclasses.dataclass
class MeshConfig:
    data: Optional[int] = None           # null: every local device not used by fsdp
    fsdp: int = 1


@dataclasses.dataclass
class PseudoLabelConfig:
    """How the teacher answers the prompts (seed prompts and synthesised requests): SeqKD labels."""
    max_new_tokens: int = 64
    batch_size: int = 64
    temperature: float = 0.0             # 0: greedy
    top_p: float = 1.0
    answers_per_request: int = 1         # > 1 needs temperature > 0
    prompt_bucket: int = 32              # prompts are padded to a multiple of this: fewer shapes to compile


@dataclasses.dataclass
class SynthConfig:
    """Teacher-synthesised user requests (Magpie): the teacher continues its template's user-turn opening."""
    num_requests: int = 0                # 0: answer only the seed prompts
    max_new_tokens: int = 64             # per request
    batch_size: int = 64
    temperature: float = 1.0
    top_p: float = 0.95
    min_chars: int = 12
    max_chars: int = 600
    require_end_of_turn: bool = True


MIX_SOURCES = ("chat", "text", "repeat", "teacher_text")     # the stage-0/1 row sources data.mix weighs


@dataclasses.dataclass
class DataConfig:
    prompts: List[str] = field(default_factory=lambda: ["chatterbot"])   # seed prompts: or l2m_jax.data.sources specs
    max_prompts: Optional[int] = 192     # the first N seed prompts (null: all)
    max_prompt_len: Optional[int] = None  # longer prompts are dropped (null: seq_len - max_new_tokens)
    # plain text for word-level KL: .txt files / folders / hf:NAME / prose (Debian texts, l2m_jax.data.prose)
    text: List[str] = field(default_factory=list)
    text_max_tokens: Optional[int] = None
    mix: Dict[str, float] = field(default_factory=lambda: {"chat": 1.0, "text": 1.0})   # stage-0/1 row weights
    # mix.repeat > 0: rows of data.text whose first repeat_period tokens are tiled (data.text.repeat_rows), so
    # the teacher's copying is distilled too (null: seq_len // 2, two copies per row)
    repeat_period: Optional[int] = None
    # mix.teacher_text > 0: teacher_text_rows rows the teacher writes (l2m_jax.data.teacher_text), each opening
    # with the first teacher_text_prefix tokens of a data.text row (0: from the start token alone), sampled with
    # synth.temperature / synth.top_p; kept in out/teacher_text
    teacher_text_rows: int = 2048
    teacher_text_prefix: int = 16
    # drop text / conversations sharing an n-token span with a held-out text (13 BPE tokens ~ 10 words; a
    # byte-level tokenizer needs a larger n, e.g. 64, or it drops most English text)
    decontaminate: Optional[int] = 13
    # also drop what shares 10 words in a row with the books the held-out texts come from (the whole KJV, Austen's
    # novels; kept beside the prose in $L2M_CACHE/texts-v2/books when data.text=prose fetches it): what the
    # teacher writes may quote them from memory without sharing a span with the held-out excerpts themselves
    screen_books: bool = True
    loss_on_prompts: bool = True         # stage 0/1: every real token is a target (the teacher wrote the requests)
    sft: List[str] = field(default_factory=lambda: ["pseudo_labels"])
    max_sft_rows: Optional[int] = None   # per dataset source
    preferences: List[str] = field(default_factory=lambda: ["synthetic"])
    max_preference_rows: Optional[int] = None
    heldout_preferences: float = 0.1     # share of the preference pairs kept out of DPO to evaluate it
    synthetic_mode: str = "mixed"        # how synthetic rejections are made (l2m_jax.data.preference)
    seq_len: int = 128
    truncate: bool = False               # cut over-long examples instead of dropping them
    packing: bool = True                 # concatenate examples into seq_len blocks (stage 0/1 and SFT)


@dataclasses.dataclass
class StageConfig:
    steps: Optional[int] = 24            # optimizer updates (null: one epoch of the stage's data)
    batch_size: int = 2                  # rows per micro-batch, over all devices
    accum_steps: int = 1
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: Optional[float] = 1.0
    warmup_steps: Optional[int] = None   # exactly one of warmup_steps / warmup_ratio
    warmup_ratio: Optional[float] = 0.1
    loss_chunk: Optional[int] = None     # positions per chunk of the loss (no whole [B, L, V] fp32 logits); null: off


@dataclasses.dataclass
class Stage0Config(StageConfig):
    enabled: bool = True                 # layer-wise alignment before every stage-1 round
    steps: Optional[int] = 32
    lr: float = 1e-3
    clip_norm: Optional[float] = 1.0
    warmup_steps: Optional[int] = 4
    warmup_ratio: Optional[float] = None


@dataclasses.dataclass
class Stage1Config(StageConfig):
    attn_fractions: List[float] = field(default_factory=lambda: [0.75, 0.5])   # [] skips stage 1
    stepwise: bool = False               # one layer per round (MiL's stepwise order) instead
    # which layers turn Mamba first: "mil" (MiL's interleaving: 50% -> the even layers convert), "aligned":
    # stage 0 once with every layer converted, then the layers its mixers reproduce best convert first
    # (train.align.layer_nmse, conversion_order); every round takes its new mixers from that aligned student;
    # "aligned_kl": the same, ranked by what converting each layer alone costs the output (train.align.layer_kl)
    layer_order: str = "mil"
    # with an aligned order: the teacher's k layers with the strongest induction heads (eval.recall: attention
    # on the token after an earlier occurrence, on repeated random tokens) turn Mamba last, whatever their score
    keep_induction: int = 0
    steps: Optional[int] = 64            # per round
    round_steps: Optional[List[int]] = None   # steps of each round (one per attn_fraction), instead of steps
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    clip_norm: Optional[float] = 0.1
    warmup_steps: Optional[int] = 4
    warmup_ratio: Optional[float] = None
    alpha: float = 1.0                   # CE weight
    beta: float = 1.0                    # KL weight
    kl_reduction: str = "token_mean"     # or "mil": summed over positions and vocab / batch size, unmasked
    temperature: float = 1.0
    train_attention: bool = False        # the kept attention layers train too (MiL: frozen; MLPs stay frozen)
    # the teacher's final hidden states of every stage-1 row computed once (N·L·D values in compute_dtype, in
    # host memory), so stage-1 and KD steps run only its head instead of its layers: the same loss
    teacher_cache: bool = False


@dataclasses.dataclass
class SftConfig(StageConfig):
    attn_fractions: List[float] = field(default_factory=lambda: [0.5])   # append 0.25, 0.125, 0.0 for more rounds
    interleave: bool = False             # an SFT round at a stage-1 fraction runs right after that round (the
                                         # next stage-1 round continues from it); false: every SFT round at the end
    steps: Optional[int] = 32
    lr: float = 5e-5
    loss: str = "ce"                     # "ce": CE on the answers (SFT); "kd": MiL's end-to-end KD, every parameter
    alpha: float = 0.0                   # loss="kd": CE weight (MiL's later runs: KL only)
    beta: float = 1.0                    # loss="kd": KL weight; it trains on the stage-1 rows


@dataclasses.dataclass
class DpoConfig(StageConfig):
    enabled: bool = True
    steps: Optional[int] = 16
    lr: float = 5e-6
    beta: float = 0.1
    reference: str = "teacher"           # or "sft": a frozen copy of the student entering DPO
    max_len: Optional[int] = None        # null: data.seq_len
    max_prompt_len: Optional[int] = None  # null: max_len // 2 (longer prompts are cut from the left)


@dataclasses.dataclass
class EvalConfig:
    texts: List[str] = field(default_factory=lambda: ["persuasion", "kjv-john"])   # l2m_jax.assets.heldout_texts()
    tokens: int = 1024                   # held-out tokens scored per text
    window: int = 256


@dataclasses.dataclass
class KernelConfig:
    """Which implementation runs the models' hot loops (the switches of l2m_jax.ops), set when a run starts."""
    attention: str = "reference"         # full-sequence attention (training, scoring, prefill): reference | xla |
                                         # cudnn | auto (cudnn where it can run, xla elsewhere): ops.attention
    ssd: str = "xla"                     # the Mamba-2 mixers' full-sequence scan: xla | pallas (GPU): ops.ssm
    decode_attention: str = "full"       # cached attention in generation: full | blocked | pallas (GPU)


KERNEL_CHOICES = {"attention": ("reference", "xla", "cudnn", "auto"), "ssd": ("xla", "pallas"),
                  "decode_attention": ("full", "blocked", "pallas")}
GPU_ONLY = {("attention", "cudnn"), ("ssd", "pallas"), ("decode_attention", "pallas")}


@dataclasses.dataclass
class RecipeConfig:
    preset: str = "smollm2"
    teacher: str = "smollm2"             # l2m_jax.load path or name; "tiny-random" for tests and debugging
    tokenizer: Optional[str] = None      # null: the teacher's
    dtype: Optional[str] = None          # load the teacher in this dtype (bfloat16 on GPUs)
    compute_dtype: Optional[str] = None  # training steps compute in this dtype (mixed precision: parameters,
                                         # masters and the loss stay in theirs); evaluation and generation do not
    mixer: str = "mamba2"                # "mamba2" or "mamba" (MiL's Mamba-1)
    init: str = "calibrated"             # how converted layers start (l2m_jax.convert.hybridize.INITS)
    calibration_rows: int = 8            # stage-1 rows the calibrated init measures output scales on
    out: str = "runs/${preset}"
    seed: int = 0
    progress: bool = True
    verbose: bool = False                # log every parameter's shape and sharding
    save_every: int = 200
    keep_checkpoints: bool = False       # keep a finished stage's optimizer checkpoint
    resume_with_changes: bool = False    # resume `out` with changed optimisation settings (CHANGEABLE_ON_RESUME)
    compile_ahead: bool = True           # with JAX's persistent compilation cache on: compile later stages' train
                                         # steps in a background thread while earlier stages run
    mesh: MeshConfig = field(default_factory=MeshConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage0: Stage0Config = field(default_factory=Stage0Config)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    sft: SftConfig = field(default_factory=SftConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _has_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def use_kernels(c) -> None:
    """Set the kernel switches of l2m_jax.ops from c.kernels (programs traced afterwards use them)."""
    from l2m_jax.ops import attention, ssm

    kernels = getattr(c, "kernels", KernelConfig())
    attention.set_attention(kernels.attention)
    ssm.set_ssd_backend(kernels.ssd)
    attention.set_decode_attention(kernels.decode_attention)


def check_config(c) -> None:
    """Value checks the types cannot express; raises one UsageError naming every bad key."""
    from l2m_jax.assets import heldout_texts

    problems = []
    if c.mixer not in ("mamba", "mamba2"):
        problems.append(f"mixer={c.mixer!r}: choose 'mamba2' or 'mamba'")
    if c.init not in INITS:
        problems.append(f"init={c.init!r}: choose one of {list(INITS)}")
    from l2m_jax.train.stages import COMPUTE_DTYPES

    if c.compute_dtype is not None and c.compute_dtype not in COMPUTE_DTYPES:
        problems.append(f"compute_dtype={c.compute_dtype!r}: choose one of {list(COMPUTE_DTYPES)} (or null: the "
                        "teacher's dtype)")
    kernels = getattr(c, "kernels", KernelConfig())
    for key, choices in KERNEL_CHOICES.items():
        value = getattr(kernels, key)
        if value not in choices:
            problems.append(f"kernels.{key}={value!r}: choose one of {list(choices)}")
        elif (key, value) in GPU_ONLY and not _has_gpu():
            problems.append(f"kernels.{key}={value!r} runs on a GPU only and JAX sees none here; use "
                            f"kernels.{key}={KERNEL_CHOICES[key][0]} (the default)")
    if c.calibration_rows < 1:
        problems.append(f"calibration_rows={c.calibration_rows} must be >= 1")
    if c.stage1.kl_reduction not in ("token_mean", "mil"):
        problems.append(f"stage1.kl_reduction={c.stage1.kl_reduction!r}: choose 'token_mean' or 'mil'")
    if c.stage1.layer_order not in ("mil", *ALIGNED_ORDERS):
        problems.append(f"stage1.layer_order={c.stage1.layer_order!r}: choose 'mil' (MiL's interleaving), "
                        "'aligned' (by stage-0 alignment error) or 'aligned_kl' (by the output KL of each layer "
                        "converted alone)")
    elif c.stage1.layer_order in ALIGNED_ORDERS and not c.stage0.enabled:
        problems.append(f"stage1.layer_order={c.stage1.layer_order!r} ranks the layers by a stage-0 run with every "
                        "layer converted; set stage0.enabled=true (its steps, batch and lr are used) or "
                        "layer_order=mil")
    if c.stage1.keep_induction < 0:
        problems.append(f"stage1.keep_induction={c.stage1.keep_induction} must be >= 0")
    elif c.stage1.keep_induction and c.stage1.layer_order not in ALIGNED_ORDERS:
        problems.append(f"stage1.keep_induction={c.stage1.keep_induction} reorders a ranked conversion order; set "
                        "stage1.layer_order=aligned (or aligned_kl), or keep_induction=0 with layer_order=mil")
    if c.sft.loss not in ("ce", "kd"):
        problems.append(f"sft.loss={c.sft.loss!r}: choose 'ce' (cross-entropy on answers) or 'kd' (end-to-end KD)")
    if c.dpo.reference not in ("teacher", "sft"):
        problems.append(f"dpo.reference={c.dpo.reference!r}: choose 'teacher' or 'sft'")
    rs = c.stage1.round_steps
    if rs is not None:
        if c.stage1.stepwise:
            problems.append("stage1.round_steps applies to the rounds of stage1.attn_fractions, not to "
                            "stage1.stepwise=true; set stage1.steps instead")
        elif len(rs) != len(c.stage1.attn_fractions) or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in rs):
            problems.append(f"stage1.round_steps={list(rs)} must give one positive step count per round of "
                            f"stage1.attn_fractions={list(c.stage1.attn_fractions)} (or null: stage1.steps each)")
    if c.sft.interleave and c.sft.attn_fractions and (c.stage1.stepwise or not set(
            map(float, c.sft.attn_fractions)) & set(map(float, c.stage1.attn_fractions))):
        problems.append(f"sft.interleave=true runs each SFT round right after the stage-1 round at its fraction, but "
                        f"sft.attn_fractions={list(c.sft.attn_fractions)} share none with stage1.attn_fractions="
                        f"{list(c.stage1.attn_fractions)}" + (" (stage1.stepwise rounds have none)" if c.stage1.stepwise
                                                              else "") + "; list a stage-1 fraction or set false")
    for name in STAGE_KINDS:
        s = getattr(c, name)
        if s.steps is not None and s.steps < 1:
            problems.append(f"{name}.steps={s.steps} must be >= 1 (or null for one epoch)")
        if s.batch_size < 1 or s.accum_steps < 1:
            problems.append(f"{name}.batch_size and {name}.accum_steps must be >= 1")
        if (s.warmup_steps is None) == (s.warmup_ratio is None):
            problems.append(f"{name}: set exactly one of warmup_steps and warmup_ratio (the other to null)")
        if s.loss_chunk is not None and s.loss_chunk < 1:
            problems.append(f"{name}.loss_chunk={s.loss_chunk} must be a positive number of positions (or null)")
        if len(s.betas) != 2:
            problems.append(f"{name}.betas must be two numbers, got {list(s.betas)}")
    needs_labels = (bool(c.stage1.attn_fractions) or "pseudo_labels" in c.data.sft
                    or "synthetic" in c.data.preferences)
    if needs_labels and not c.data.prompts and c.synth.num_requests == 0:
        problems.append("data.prompts is empty and synth.num_requests is 0: the teacher has nothing to answer")
    for key, needed in (("sft", bool(c.sft.attn_fractions)), ("preferences", c.dpo.enabled)):
        if needed and not getattr(c.data, key):
            problems.append(f"data.{key} is empty; name at least one source")
    unknown_mix = sorted(set(c.data.mix) - set(MIX_SOURCES))
    if unknown_mix:
        problems.append(f"data.mix has unknown sources {unknown_mix}; the stage-1 sources are "
                        f"{', '.join(repr(m) for m in MIX_SOURCES)}")
    if c.data.mix.get("teacher_text", 0) > 0:
        if c.data.teacher_text_rows < 1:
            problems.append(f"data.teacher_text_rows={c.data.teacher_text_rows} must be >= 1 when "
                            "data.mix.teacher_text > 0")
        if not 0 <= c.data.teacher_text_prefix < c.data.seq_len - 1:
            problems.append(f"data.teacher_text_prefix={c.data.teacher_text_prefix} must lie in [0, seq_len - 2 = "
                            f"{c.data.seq_len - 2}]: the row holds the start token, the prefix and new tokens")
        elif c.data.teacher_text_prefix > 0 and not c.data.text:
            problems.append("data.teacher_text_prefix > 0 opens the teacher's rows with data.text, which names no "
                            "source; add one (e.g. data.text=[prose]) or set data.teacher_text_prefix=0")
    if c.data.mix.get("repeat", 0) > 0 and not c.data.text:
        problems.append("data.mix.repeat repeats spans of data.text, which names no source; add one (e.g. "
                        "data.text=[prose]) or set data.mix.repeat=0")
    p = c.data.repeat_period
    if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 0 < p < c.data.seq_len):
        problems.append(f"data.repeat_period={p!r} must be an integer in [1, seq_len - 1 = {c.data.seq_len - 1}] "
                        "(or null for seq_len // 2)")
    weights = [float(w) for w in c.data.mix.values()]
    if any(not w >= 0 for w in weights) or not any(w > 0 for w in weights):
        problems.append(f"data.mix={dict(c.data.mix)}: weights must be >= 0 and not all zero, e.g. "
                        "data.mix.chat=1 data.mix.text=1")
    missing_text = [t for t in c.data.text
                    if str(t) != "prose" and not str(t).startswith("hf:") and not os.path.exists(t)]
    if missing_text:
        problems.append(f"data.text names {missing_text}, which do not exist; give .txt files, folders of them, "
                        ".jsonl/.parquet files with a text field, hf:NAME datasets or prose (Debian texts)")
    n = c.data.decontaminate
    if n is not None and n != 0 and (isinstance(n, bool) or not isinstance(n, int) or n < 4):
        problems.append(f"data.decontaminate={n!r} must be an n-gram length >= 4 (13 is usual), or 0 / null for off")
    if c.data.mix.get("text", 0) > 0 and not c.data.text and c.data.mix.get("chat", 0) <= 0:
        problems.append("data.mix gives only 'text' a weight but data.text names no source")
    if not 0 <= c.data.heldout_preferences < 1:
        problems.append(f"data.heldout_preferences={c.data.heldout_preferences} must lie in [0, 1)")
    if c.data.max_prompts is not None and c.data.max_prompts < 1:
        problems.append(f"data.max_prompts={c.data.max_prompts} must be positive (or null for all)")
    if c.synth.num_requests < 0:
        problems.append(f"synth.num_requests={c.synth.num_requests} must be >= 0")
    if c.pseudo_labels.answers_per_request < 1:
        problems.append("pseudo_labels.answers_per_request must be >= 1")
    elif c.pseudo_labels.answers_per_request > 1 and c.pseudo_labels.temperature == 0:
        problems.append("pseudo_labels.answers_per_request > 1 needs pseudo_labels.temperature > 0 (greedy "
                        "answers would all be the same)")
    if c.data.seq_len < 8:
        problems.append(f"data.seq_len={c.data.seq_len} is too short")
    if c.eval.tokens < 2 or c.eval.window < 2:
        problems.append("eval.tokens and eval.window must be >= 2")
    known = heldout_texts()
    bad_texts = [t for t in c.eval.texts if t not in known]
    if bad_texts or not c.eval.texts:
        problems.append(f"eval.texts={list(c.eval.texts)}: choose from the held-out texts {sorted(known)}")
    if problems:
        raise UsageError("invalid configuration: " + "; ".join(problems))
