"""The distillation recipe as library functions (what `python -m experiments.zephyr_distill` runs).

    from l2m_jax import recipe
    c = recipe.RecipeConfig(teacher="smollm2")                     # or an OmegaConf view of one
    recipe.check_config(c)
    run = recipe.Run(c, out)                                        # teacher, mesh, held-out texts
    rows = run.rows()                                               # synthesised + seed chat data (cached)
    order = recipe.layer_order(run)        # None, or (stage1.layer_order=aligned) from stage align-all, run here
    plan = recipe.make_plan(c, run.teacher[0].n_layers, order)      # [align-all ->] align -> stage1 -> sft -> dpo
    student, records = run.teacher, []
    for i, stage in enumerate(plan):
        if stage.name == recipe.ALIGN_ALL:                          # trained by layer_order(run)
            continue
        record, student = recipe.run_stage(run, i, stage, student)
        records.append(record)
    recipe.export(run, lambda: student, plan[-1].name)
    recipe.write_run_report(run, plan, records)

or `recipe.pipeline(c, out)` for all of it, resumable. A draft for speculative decoding, distilled from the same
teacher on the same data: `recipe.build_draft`, `recipe.distill_draft`, `recipe.acceptance` (recipe/draft.py).
"""
from .config import RecipeConfig, UsageError, check_config, use_kernels  # noqa: F401
from .data import (chat_rows, distill_rows, heldout_ids, load_teacher, preference_rows, seed_prompts,  # noqa: F401
                   sft_rows)
from .draft import (DraftError, acceptance, build_draft, check_compatible, decode_speed, distill_draft,  # noqa: F401
                    draft_layer_ids, load_draft, save_draft, split_heldout)
from .run import (ALIGN_ALL, Run, copy_nll, evaluate, export, keep_induction, layer_order, make_plan,  # noqa: F401
                  pipeline, preference_eval, run_stage, write_run_report)
