"""Training: losses (pure functions), optimizers and freezing, the generic jitted loop, MiL's stages, reports.

    losses   KL / CE / SFT / DPO losses            optim    AdamW presets per stage, trainable masks
    loop     Trainer: one donated step on a mesh, orbax checkpoints with resume, metrics
    stages   schedule(), distill_stage, sft_stage, dpo_stage      report   loss plots and the markdown report
"""
